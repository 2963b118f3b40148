"""spark-submit jobs/ingest.py [--preset P] [--env E] [key=value ...]"""
from dollyflow.jobs.ingest import main

raise SystemExit(main())
