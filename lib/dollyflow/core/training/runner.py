"""One training run from a config: prepare, launch, finish, summarise (engine-free).

The train job (:mod:`dollyflow.jobs.train`) adds the ``train_runs`` Delta row to this; the
torchrun entry point (``python -m dollyflow.launch.torchrun``) runs it as it is, without Spark.
"""
from __future__ import annotations

import os
import time

from dollyflow.config import Config
from dollyflow.launch import DEFAULT_FN


def run_training(cfg: Config, spark=None, *, fn: str = DEFAULT_FN) -> dict:
    """Train per ``cfg`` (or skip); returns the job summary. ``fn`` is the per-rank function
    (``module:function``), :func:`~dollyflow.core.training.loop.train_main` unless a caller
    wraps it. The output directory's lease is held throughout: a second train job for the same
    directory fails at once, naming this run."""
    from dollyflow.core.training.lease import Lease
    from dollyflow.core.training.prepare import finish, output_dir_for, prepare
    from dollyflow.launch import launch

    t0 = time.time()
    with Lease(output_dir_for(cfg), cfg.run_id) as lease:
        if lease.taken_over:
            print(f"[dollyflow train] took over the lease of run {lease.taken_over.get('run_id')!r} "
                  f"(host {lease.taken_over.get('host')}): its heartbeat had stopped", flush=True)
        plan = prepare(cfg)
        summary = {"job": "train", "run_id": cfg.run_id, "skipped": plan["decision"] == "skip",
                   "decision": plan["decision"], "shard_dir": plan["shard_dir"],
                   "manifest_sha256": plan["manifest_sha256"], "source_table": plan["source"].get("table", ""),
                   "source_version": plan["source"].get("version"), "output_dir": plan["output_dir"],
                   "checkpoint_dir": plan["checkpoint_dir"], "method": cfg.train.method,
                   "launcher": plan["launcher"], "processes": plan["processes"], "model": cfg.model.name,
                   "fingerprint": plan["fingerprint"]["sha256"],
                   "lease_taken_over_from": (lease.taken_over or {}).get("run_id")}
        if plan["decision"] == "skip":
            prov = plan["provenance"]
            m = prov.get("metrics", {})
            summary.update(_metrics_summary(m), mlflow_run_id=prov.get("mlflow_run_id"), resumed_from=None,
                           message=f"{plan['output_dir']} already holds this model (same manifest and training "
                                   "config): nothing to do", started_at=t0, job_seconds=round(time.time() - t0, 2))
            print(f"[dollyflow train] {summary['message']}", flush=True)
            return summary
        spec = plan["spec"]
        print(f"[dollyflow train] {plan['mlflow_message']}", flush=True)
        if plan.get("replaces"):
            print(f"[dollyflow train] {plan['output_dir']} holds another model (fingerprint "
                  f"{str(plan.get('replaced_fingerprint'))[:16]}); train.overwrite=true: training into "
                  f"{plan['target_dir']}, swapped in once complete (the old model stays readable until then)",
                  flush=True)
        if plan["decision"] == "resume":
            print(f"[dollyflow train] resuming from the checkpoint at step {plan['resume_step']}", flush=True)
        try:
            result = launch(spec, spark=spark, fn=fn)
        except BaseException:
            try:
                finish(plan, None, failed=True)
            except Exception as exc:  # noqa: BLE001 - the training error is the one to report
                print(f"[dollyflow train] could not close the MLflow run: {exc}", flush=True)
            raise
        done = finish(plan, result)
    m = result["metrics"]
    summary.update(_metrics_summary(m), resumed_from=m.get("resumed_from"),
                   mlflow_run_id=(spec.get("mlflow") or {}).get("run_id"), mlflow=done["mlflow"] or None,
                   replaced=done["swap"], checkpoint_dir=done["checkpoint_dir"],
                   weights=result.get("weights"), adapter_dir=_final_path(result.get("adapter_dir"), plan),
                   deepspeed_preset=result.get("deepspeed_preset"), zero_stage=result.get("zero_stage"),
                   precision=result.get("precision"), started_at=t0, job_seconds=round(time.time() - t0, 2))
    return summary


def _final_path(path: str | None, plan: dict) -> str | None:
    """A path inside the directory the ranks wrote, where it is after a replacement's swap."""
    target = plan.get("target_dir")
    if not path or not target or target == plan["output_dir"]:
        return path
    rel = os.path.relpath(path, target)
    return path if rel.startswith("..") else os.path.join(plan["output_dir"], rel)


def _metrics_summary(m: dict) -> dict:
    keys = ("steps", "train_loss", "train_loss_first", "eval_loss", "eval_loss_per_category", "useful_tokens",
            "useful_tokens_per_s", "tokens_per_s", "padding_share", "train_seconds", "peak_rss_mb")
    return {k: m.get(k) for k in keys}


def train_without_spark(cfg: Config) -> dict:
    cfg.train.launcher = "torchrun" if cfg.train.launcher == "torch_distributor" else cfg.train.launcher
    return run_training(cfg, None)
