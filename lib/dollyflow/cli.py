"""The ``dollyflow`` command: one subcommand per job, plus ``config`` and ``pipeline``.

    dollyflow ingest --preset tiny ingest.input=../shared/data/dolly-sample.jsonl
    dollyflow config dedupe dedupe.threshold=0.8
    dollyflow pipeline --preset tiny ingest.input=data.jsonl     # every job, in order, + report
    dollyflow pipeline --preset tiny                             # the same on the sample data
    dollyflow report [--run-id ID]                               # rebuild a pipeline run's report

Each job is also its own console script (``dollyflow-ingest``) for a bundle's
``python_wheel_task``, and a spark-submit script (``jobs/ingest.py``). All of them take the same
arguments: ``--preset``, ``--env``, ``--conf`` and ``section.key=value`` overrides.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from datetime import date, datetime

from dollyflow.config import ConfigError, available, load_config

JOBS = ["ingest", "dedupe", "tokenize", "train", "infer"]   # pipeline order


def job_module(name: str):
    return importlib.import_module(f"dollyflow.jobs.{name}")


def installed_jobs() -> list[str]:
    out = []
    for name in JOBS:
        try:
            job_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != f"dollyflow.jobs.{name}":
                raise
            continue
        out.append(name)
    return out


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--preset", help=f"model preset in conf/model ({', '.join(_safe('model'))})")
    p.add_argument("--env", help=f"environment in conf/env ({', '.join(_safe('env'))})")
    p.add_argument("--conf", help="conf directory (default: the checkout's conf/ or the wheel's copy)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p


def _safe(kind: str) -> list[str]:
    try:
        return available(kind)
    except ConfigError:
        return []


def _json_default(o):
    if isinstance(o, (datetime, date)):
        return o.isoformat()
    return str(o)


def print_summary(summary: dict) -> None:
    """The job's summary as JSON on stdout, URIs' credentials redacted (job output is read by
    everyone with access to the job run)."""
    from dollyflow.config import redact
    print(json.dumps(redact(summary), indent=2, default=_json_default), flush=True)


def run_job(name: str, argv: list[str] | None = None) -> int:
    """Load the config for ``name``, get the Spark session, run the job, print its summary."""
    args = _parser(f"dollyflow {name}").parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(name, args.overrides, preset=args.preset, env=args.env, conf=args.conf)
    except ConfigError as exc:
        print(f"dollyflow {name}: config error: {exc}", file=sys.stderr)
        return 2
    from dollyflow.engine.session import get_session
    spark = get_session(cfg.spark)
    t0 = time.time()
    summary = job_module(name).run(cfg, spark)
    summary["seconds"] = round(time.time() - t0, 2)
    print_summary(summary)
    return 0


def run_pipeline(argv: list[str] | None = None) -> int:
    """Every installed job in order on one session, then the run report (:mod:`dollyflow.pipeline`)."""
    from dollyflow.pipeline import run_pipeline as run
    return run(argv)


def run_report(argv: list[str] | None = None) -> int:
    from dollyflow.pipeline import report_main
    return report_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ["pipeline", "report", "config"] + JOBS
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(f"usage: dollyflow {{{','.join(commands)}}} [--preset P] [--env E] [section.key=value ...]\n\n"
              + __doc__, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "pipeline":
        return run_pipeline(rest)
    if cmd == "report":
        return run_report(rest)
    if cmd == "config":
        job = rest.pop(0) if rest and not rest[0].startswith("-") and "=" not in rest[0] else ""
        args = _parser(f"dollyflow config {job}").parse_args(rest)
        try:
            cfg = load_config(job, args.overrides, preset=args.preset, env=args.env, conf=args.conf)
        except ConfigError as exc:
            print(f"dollyflow config: {exc}", file=sys.stderr)
            return 2
        print(cfg.to_yaml(), end="")
        return 0
    return run_job(cmd, rest)


if __name__ == "__main__":
    raise SystemExit(main())
