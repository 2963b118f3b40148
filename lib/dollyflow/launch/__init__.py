"""Launchers: start :func:`dollyflow.core.training.loop.train_main` on every rank.

    torch_distributor.py  Spark's TorchDistributor (local mode: ranks on the driver; distributed
                          mode: one barrier task per rank on the executors). Imports pyspark.
    torchrun.py           torch.distributed.run on this machine, no Spark (a GPU box, CI).
    horovod.py            horovod.spark.run (optional extra), used only to start the ranks.
    common.py             what every launcher shares: the per-rank wrapper that records a failing
                          rank's error, and the check that turns it into the job's error.

Each module's ``launch(spec, ..., fn)`` runs ``fn`` on ``spec.processes`` ranks and returns rank
0's result; the train job (:mod:`dollyflow.jobs.train`) picks one by ``spec.launcher``. The loop
never knows which launcher started it: each sets the torch.distributed environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and calls :func:`common.run_rank` with the
function reference and ``spec.to_dict()``. Launchers import only ``dollyflow.core`` and
``dollyflow.config``.
"""
