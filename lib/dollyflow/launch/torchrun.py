"""torchrun: the ranks on this machine with ``torch.distributed.run``, no Spark (no pyspark import).

``launch(spec)`` is the launcher the train job uses with ``train.launcher=torchrun``; each rank
runs this module as ``--rank <spec.json> <fn>``. The user form

    python -m dollyflow.launch.torchrun --preset tiny train.processes=2      # a GPU box or CI

is ``python -m dollyflow train --no-spark ...`` (this process is replaced by it): the whole
train job without Spark: resolve and verify the shards, skip/resume/conflict, the MLflow run,
the ranks, the model directory (no ``train_runs`` Delta row: that needs Spark).
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

from dollyflow.core.training.spec import TrainSpec
from dollyflow.launch.common import DEFAULT_FN, TrainingFailed, check, cleanup, read_result, run_rank, status_dir

TAIL_LINES = 200


def command(spec_path: str, processes: int, fn: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc_per_node={processes}", "-m", "dollyflow.launch.torchrun", "--rank", spec_path, fn]


def launch(spec: TrainSpec, *, fn: str = DEFAULT_FN) -> dict:
    """Start ``spec.processes`` ranks of ``fn`` with torchrun; rank 0's result."""
    sdir = status_dir(spec)
    os.makedirs(sdir, exist_ok=True)
    spec_path = os.path.join(sdir, "spec.json")
    # the ranks need the real paths (a shard URI may carry credentials): owner-only, removed after
    # the run; the config inside it is redacted already (Config.redacted)
    fd = os.open(spec_path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(spec.to_dict(), f, default=str)
    env = dict(os.environ)
    lib = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in [lib, env.get("PYTHONPATH", "")] if p)
    tail: collections.deque = collections.deque(maxlen=TAIL_LINES)
    try:
        proc = subprocess.Popen(command(spec_path, spec.processes, fn), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace")
            tail.append(line)
            sys.stdout.write(line)
        sys.stdout.flush()
        rc = proc.wait()
        if rc != 0:
            check(spec, RuntimeError(f"torchrun exited with code {rc}; last lines:\n{''.join(tail)}"))
        check(spec)
        result = read_result(spec)
        if result is None:
            raise TrainingFailed("torchrun finished but rank 0 left no result")
        return result
    finally:
        cleanup(spec)


def _rank_main(spec_path: str, fn: str) -> int:
    with open(spec_path, encoding="utf-8") as f:
        data = json.load(f)
    run_rank(fn, data)
    return 0


def job_command(argv: list[str]) -> list[str]:
    """The train job without Spark, with the user's arguments (what the user form runs)."""
    return [sys.executable, "-m", "dollyflow", "train", "--no-spark", *argv]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--rank":
        return _rank_main(argv[1], argv[2] if len(argv) > 2 else DEFAULT_FN)
    cmd = job_command(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)      # replaces this process: the CLI parses the arguments, not this launcher
    return 0                   # pragma: no cover - execv does not return


if __name__ == "__main__":
    raise SystemExit(main())
