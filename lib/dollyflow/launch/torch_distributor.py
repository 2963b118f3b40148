"""Spark's TorchDistributor as the launcher (imports pyspark).

``TorchDistributor(num_processes, local_mode, use_gpu).run(run_rank, fn, spec)``: in local mode
torchrun starts the ranks on the driver; otherwise one barrier task per rank runs on the
executors (``spark.task.resource.gpu.amount=1`` on GPU clusters; Databricks GPU runtimes set the
executor side). Why ``TorchDistributor`` and not ``DeepspeedTorchDistributor``: the latter only
adds ``--deepspeed --deepspeed_config <file>`` to the launched script's argv and counts processes
as GPUs per node x nodes; the loop builds its DeepSpeed config itself on the ranks (the ``auto``
preset depends on the GPU they see), so the plain distributor with any ``num_processes`` is the
better fit.

Its gaps are closed here: local mode hides torchrun's exit code (its wrapper always exits 0) and
the returned value may come from any rank, so the per-rank status files decide success
(:mod:`dollyflow.launch.common`) and the loop broadcasts rank 0's summary to every rank.
"""
from __future__ import annotations

from dollyflow.core.training.spec import TrainSpec
from dollyflow.launch.common import DEFAULT_FN, TrainingFailed, check, cleanup, read_result, run_rank


def detect_gpu(spark, local_mode: bool) -> bool:
    """Local mode: the driver sees a CUDA GPU. Distributed mode: tasks are given GPUs."""
    if local_mode:
        try:
            import torch
            return bool(torch.cuda.is_available())
        except ImportError:
            return False
    try:
        return float(spark.conf.get("spark.task.resource.gpu.amount", "0") or 0) > 0
    except Exception:  # noqa: BLE001 - Spark Connect may refuse conf reads
        return False


def launch(spec: TrainSpec, *, spark, fn: str = DEFAULT_FN) -> dict:
    from pyspark.ml.torch.distributor import TorchDistributor

    if spark is None:
        raise ValueError("train.launcher=torch_distributor needs a SparkSession (use train.launcher=torchrun "
                         "without Spark)")
    t = spec.train
    use_gpu = t.use_gpu if t.use_gpu is not None else detect_gpu(spark, t.local_mode)
    distributor = TorchDistributor(num_processes=spec.processes, local_mode=t.local_mode, use_gpu=bool(use_gpu))
    try:
        try:
            result = distributor.run(run_rank, fn, spec.to_dict())
        except Exception as exc:  # noqa: BLE001 - replaced by the failing rank's own error
            check(spec, exc)
            raise
        check(spec)
        if not isinstance(result, dict):
            result = read_result(spec)
        if result is None:
            raise TrainingFailed("TorchDistributor finished but rank 0 left no result")
        result["use_gpu"] = bool(use_gpu)
        return result
    finally:
        cleanup(spec)
