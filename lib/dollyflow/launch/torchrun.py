"""torchrun: the ranks on this machine with ``torch.distributed.run``, no Spark (no pyspark import).

    python -m dollyflow.launch.torchrun --preset tiny train.processes=2      # a GPU box or CI

runs the whole train job without Spark: resolve and verify the shards, skip/resume/conflict, the
MLflow run, the ranks, the model directory (no ``train_runs`` Delta row: that needs Spark).
``launch(spec)`` is the launcher the job uses with ``train.launcher=torchrun``.
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

from dollyflow.launch import DEFAULT_FN
from dollyflow.launch.common import TrainingFailed, check, cleanup, read_result, run_rank, status_dir

TAIL_LINES = 200


def command(spec_path: str, processes: int, fn: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc_per_node={processes}", "-m", "dollyflow.launch.torchrun", "--rank", spec_path, fn]


def launch(spec: dict, *, fn: str = DEFAULT_FN) -> dict:
    """Start ``spec["processes"]`` ranks of ``fn`` with torchrun; rank 0's result."""
    sdir = status_dir(spec)
    os.makedirs(sdir, exist_ok=True)
    spec_path = os.path.join(sdir, "spec.json")
    # the ranks need the real paths (a shard URI may carry credentials): owner-only, removed after
    # the run; the config inside it is redacted already (Config.redacted)
    fd = os.open(spec_path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(spec, f, default=str)
    env = dict(os.environ)
    lib = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in [lib, env.get("PYTHONPATH", "")] if p)
    tail: collections.deque = collections.deque(maxlen=TAIL_LINES)
    try:
        proc = subprocess.Popen(command(spec_path, int(spec["processes"]), fn), stdout=subprocess.PIPE,
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
        spec = json.load(f)
    run_rank(fn, spec)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--rank":
        return _rank_main(argv[1], argv[2] if len(argv) > 2 else DEFAULT_FN)
    from dollyflow.cli import _parser, print_summary
    from dollyflow.config import ConfigError, load_config
    from dollyflow.core.training.runner import train_without_spark

    args = _parser("python -m dollyflow.launch.torchrun").parse_args(argv)
    try:
        cfg = load_config("train", list(args.overrides) + ["train.launcher=torchrun"], preset=args.preset,
                          env=args.env, conf=args.conf)
    except ConfigError as exc:
        print(f"dollyflow train (torchrun): config error: {exc}", file=sys.stderr)
        return 2
    print_summary(train_without_spark(cfg))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
