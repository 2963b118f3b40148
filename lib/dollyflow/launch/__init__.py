"""Launchers: start :func:`dollyflow.core.training.loop.train_main` on every rank.

    torch_distributor.py  Spark's TorchDistributor (local mode: ranks on the driver; distributed
                          mode: one barrier task per rank on the executors). Imports pyspark.
    torchrun.py           torch.distributed.run on this machine, no Spark (a GPU box, CI).
    horovod.py            horovod.spark.run (optional extra), used only to start the ranks.
    common.py             what every launcher shares: the per-rank wrapper that records a failing
                          rank's error, and the check that turns it into the job's error.

The loop never knows which launcher started it: each sets the torch.distributed environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and calls
:func:`common.run_rank` with the function reference and the spec.
"""
from __future__ import annotations

DEFAULT_FN = "dollyflow.core.training.loop:train_main"


def launch(spec: dict, *, spark=None, fn: str = DEFAULT_FN) -> dict:
    """Run ``fn(spec)`` on ``spec["processes"]`` ranks with ``spec["launcher"]``; rank 0's result."""
    name = spec["launcher"]
    if name == "torchrun":
        from dollyflow.launch.torchrun import launch as run
        return run(spec, fn=fn)
    if name == "torch_distributor":
        from dollyflow.launch.torch_distributor import launch as run
        return run(spec, spark=spark, fn=fn)
    if name == "horovod":
        from dollyflow.launch.horovod import launch as run
        return run(spec, spark=spark, fn=fn)
    raise ValueError(f"train.launcher: unknown launcher {name!r}")
