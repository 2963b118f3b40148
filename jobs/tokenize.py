"""spark-submit jobs/tokenize.py [--preset P] [--env E] [key=value ...]"""
import os
import sys

# This file shares its name with the standard library's tokenize module: keep its directory off
# the import path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from dollyflow.jobs.tokenize import main  # noqa: E402

raise SystemExit(main())
