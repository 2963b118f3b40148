"""What every launcher shares (no pyspark here).

A failing rank must fail the job *with that rank's error text*, but launchers lose it: torchrun
reports only "ChildFailedError", TorchDistributor's local mode runs torchrun through a wrapper that
always exits 0 (a failed run then looks like success, or like a missing output file), and the
rank that fails first is often not the one whose error surfaces (the others die of a broken
connection). So each rank runs inside :func:`run_rank`, which writes the exception of a failing
rank to ``<status dir>/rank-<r>.error.json`` before re-raising, and rank 0's return value to
``result.json``. After the launcher returns or raises, :func:`check` raises
:class:`TrainingFailed` naming the *first* rank that failed, with its message and traceback.
The status directory is ``<output_dir>/.runs/<run_id>/`` (a path every rank sees) and is removed
afterwards.

Launchers take a :class:`~dollyflow.core.training.spec.TrainSpec` and ship ``spec.to_dict()`` to
the ranks; :func:`run_rank` rebuilds it there (:meth:`TrainSpec.from_dict` fails at once on an
unknown or missing key) and calls the per-rank function, :data:`DEFAULT_FN` unless a caller wraps it.
"""
from __future__ import annotations

import importlib
import json
import os
import socket
import time
import traceback

from dollyflow.core.storage import remove_dir, write_atomic
from dollyflow.core.training.spec import TrainSpec

#: The per-rank function every launcher starts (``module:function``): the training recipe.
DEFAULT_FN = "dollyflow.core.training.loop:train_main"


class TrainingFailed(RuntimeError):
    """A rank failed; the message starts with ``rank <r> failed: <error>``."""

    def __init__(self, message: str, rank: int | None = None, error: str | None = None):
        super().__init__(message)
        self.rank = rank
        self.error = error


def status_dir(spec: TrainSpec) -> str:
    return os.path.join(spec.output_dir, ".runs", spec.run_id)


def resolve_fn(ref: str):
    """``module:function`` -> the function."""
    module, _, name = ref.partition(":")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _rank() -> int:
    for key in ("RANK", "HOROVOD_RANK", "OMPI_COMM_WORLD_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def run_rank(fn_ref: str, data: dict):
    """Run ``fn_ref(spec)`` on this rank with the spec rebuilt from ``data`` (``spec.to_dict()``),
    recording a failure (and rank 0's result)."""
    spec = TrainSpec.from_dict(data)
    rank = _rank()
    sdir = status_dir(spec)
    os.makedirs(sdir, exist_ok=True)
    try:
        result = resolve_fn(fn_ref)(spec)
    except BaseException as exc:
        record = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
                  "type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}
        write_atomic(os.path.join(sdir, f"rank-{rank}.error.json"), json.dumps(record).encode("utf-8"))
        raise
    if rank == 0:
        write_atomic(os.path.join(sdir, "result.json"), json.dumps(result, default=str).encode("utf-8"))
    return result


def errors(spec: TrainSpec) -> list[dict]:
    """The recorded rank failures, earliest first."""
    sdir = status_dir(spec)
    out = []
    try:
        names = os.listdir(sdir)
    except FileNotFoundError:
        return []
    for name in names:
        if name.startswith("rank-") and name.endswith(".error.json"):
            try:
                with open(os.path.join(sdir, name), encoding="utf-8") as f:
                    out.append(json.load(f))
            except (OSError, ValueError):
                continue
    return sorted(out, key=lambda e: (e["time"], e["rank"]))


def read_result(spec: TrainSpec) -> dict | None:
    try:
        with open(os.path.join(status_dir(spec), "result.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def failure(spec: TrainSpec, launcher_error: BaseException | str | None = None) -> TrainingFailed | None:
    """The job's error when any rank failed (or the launcher did), else None."""
    errs = errors(spec)
    if errs:
        first = errs[0]
        others = ", ".join(str(e["rank"]) for e in errs[1:])
        tb = first["traceback"].strip().splitlines()
        msg = (f"rank {first['rank']} failed: {first['type']}: {first['message']}"
               + (f" (then rank(s) {others})" if others else "")
               + f"\n--- rank {first['rank']} on {first['host']} ---\n" + "\n".join(tb[-30:]))
        return TrainingFailed(msg, first["rank"], first["message"])
    if launcher_error is not None:
        text = str(launcher_error)
        return TrainingFailed(f"training failed without a rank's error record (a rank killed by a signal or "
                              f"out of memory?): {text[-4000:]}")
    return None


def check(spec: TrainSpec, launcher_error: BaseException | None = None) -> None:
    err = failure(spec, launcher_error)
    if err is not None:
        if launcher_error is not None and not isinstance(launcher_error, TrainingFailed):
            raise err from launcher_error
        raise err


def cleanup(spec: TrainSpec) -> None:
    """Remove this run's status directory (and ``.runs/`` when that leaves it empty); it must lie
    below ``<output_dir>/.runs``, whatever the run id."""
    runs = os.path.join(spec.output_dir, ".runs")
    remove_dir(status_dir(spec), under=runs)
    try:
        os.rmdir(runs)
    except OSError:
        pass
