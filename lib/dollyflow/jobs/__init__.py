"""The jobs, in pipeline order: each module's ``run(cfg, spark) -> summary`` is the job.

A job never parses argv (:mod:`dollyflow.cli` does) and chooses its own executor where it has one
(the train job its launcher). ``installed()`` leaves out a job whose module a trimmed install
does not ship.
"""
from __future__ import annotations

import importlib
from types import ModuleType

ORDER = ["ingest", "dedupe", "filter", "tokenize", "train", "infer", "evaluate"]


def job_module(name: str) -> ModuleType:
    """The module of job ``name`` (imported on first use: train and infer pull in torch, evaluate and the others pyspark)."""
    if name not in ORDER:
        raise ValueError(f"unknown job {name!r}; jobs: {', '.join(ORDER)}")
    return importlib.import_module(f"{__name__}.{name}")


def installed() -> list[str]:
    out = []
    for name in ORDER:
        try:
            job_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            continue
        out.append(name)
    return out
