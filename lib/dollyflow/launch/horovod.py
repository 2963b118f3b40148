"""Horovod as the launcher (optional extra: ``scripts/build_horovod.sh`` builds 0.28.1 here).

``horovod.spark.run`` starts one process per rank in Spark tasks (it needs a classic
SparkContext, not Spark Connect). Horovod is used only to start and rendezvous the ranks: rank 0
picks an address and a free port, ``hvd.broadcast_object`` hands it to all, and the loop then
runs over torch.distributed + DeepSpeed exactly as under the other launchers. Databricks
deprecated Horovod after 15.4 LTS ML; TorchDistributor is the default.
"""
from __future__ import annotations

import os

from dollyflow.core.training.rendezvous import free_port, host_address
from dollyflow.core.training.spec import TrainSpec
from dollyflow.launch.common import DEFAULT_FN, check, cleanup, run_rank


def available() -> tuple[bool, str]:
    try:
        import horovod.spark  # noqa: F401
        import horovod.torch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError or a broken build
        return False, f"horovod is not importable ({type(exc).__name__}: {exc}); build it with scripts/build_horovod.sh"
    return True, ""


def hvd_rank(fn: str, spec: dict):
    """One Horovod process: set the torch.distributed environment from Horovod's ranks, run
    ``fn`` on the spec (``TrainSpec.to_dict()``)."""
    import horovod.torch as hvd

    hvd.init()
    try:
        addr = (host_address(), free_port()) if hvd.rank() == 0 else None
        addr = hvd.broadcast_object(addr, root_rank=0, name="dollyflow_master")
        os.environ.update(RANK=str(hvd.rank()), WORLD_SIZE=str(hvd.size()), LOCAL_RANK=str(hvd.local_rank()),
                          MASTER_ADDR=str(addr[0]), MASTER_PORT=str(addr[1]))
        return run_rank(fn, spec)
    finally:
        hvd.shutdown()


def launch(spec: TrainSpec, *, spark=None, fn: str = DEFAULT_FN) -> dict:
    ok, why = available()
    if not ok:
        raise RuntimeError(f"train.launcher=horovod: {why}")
    import horovod.spark

    try:
        try:
            results = horovod.spark.run(hvd_rank, args=(fn, spec.to_dict()), num_proc=spec.processes,
                                        use_gloo=True, verbose=1)
        except Exception as exc:  # noqa: BLE001 - replaced by the failing rank's own error
            check(spec, exc)
            raise
        check(spec)
        return results[0]
    finally:
        cleanup(spec)
