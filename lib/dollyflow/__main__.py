"""``python -m dollyflow ...``: the ``dollyflow`` command (:mod:`dollyflow.cli`)."""
from dollyflow.cli import main

raise SystemExit(main())
