"""spark-submit jobs/filter.py [--preset P] [--env E] [key=value ...]"""
import os
import sys

# This directory holds tokenize.py, which would shadow the standard library's tokenize module.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from dollyflow.cli import run_job  # noqa: E402

raise SystemExit(run_job("filter", sys.argv[1:]))
