"""spark-submit jobs/train.py [--preset P] [--env E] [key=value ...]"""
import os
import sys

# Keep this directory off the import path (jobs/tokenize.py would shadow the standard library).
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from dollyflow.cli import run_job  # noqa: E402

raise SystemExit(run_job("train"))
