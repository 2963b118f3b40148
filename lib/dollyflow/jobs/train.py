"""train: fine-tune the model on the tokenize job's shards; one row per run -> ``train_runs``.

The loop (:mod:`dollyflow.core.training`) is engine-free; this job only launches it on the
cluster (``train.launcher``: TorchDistributor by default, torchrun, Horovod) and records the run:

- input: the shard directory, ``train.shard_dir`` or the tokenize job's shards root (its
  ``LATEST.json``), verified against its manifest before anything is launched;
- output: a Hugging Face model directory (``train.output_dir``, default
  ``<files root>/models/<model>-<method>-<manifest sha8>``) with the model card, provenance and
  ``metrics.jsonl``; checkpoints under ``<output_dir>/checkpoints``; an MLflow run;
- a rerun with the same manifest and training config is a no-op (``skipped: true``) whatever
  ``train.overwrite`` says, one with checkpoints of the same run resumes, a different one fails
  naming what differs unless ``train.overwrite=true``: then the new model is trained beside the
  old one and swapped in once complete (a failed or NaN run leaves the old model in place);
- one train job per output directory at a time (a lease beside it); the ``train_runs`` row is
  written only for a run that finished.
"""
from __future__ import annotations

from dollyflow.config import Config
from dollyflow.launch import DEFAULT_FN

RUNS_DDL = ("run_id string, started_at timestamp, finished_at timestamp, skipped boolean, decision string, "
            "shard_dir string, manifest_sha256 string, source_table string, source_version long, "
            "output_dir string, model string, method string, launcher string, processes int, steps long, "
            "resumed_from long, train_loss double, eval_loss double, eval_loss_per_category map<string,double>, "
            "useful_tokens_per_s double, tokens_per_s double, padding_share double, mlflow_run_id string, "
            "fingerprint string")


def _f(x):
    return None if x is None else float(x)


def _i(x):
    return None if x is None else int(x)


def runs_row(summary: dict) -> tuple:
    from datetime import datetime, timezone

    from dollyflow.config import redact

    summary = redact(summary)     # shard and output paths may be URIs with credentials
    per_cat = {c: float(d["loss"]) for c, d in (summary.get("eval_loss_per_category") or {}).items()}
    return (summary["run_id"], datetime.fromtimestamp(summary["started_at"], timezone.utc),
            datetime.now(timezone.utc), bool(summary["skipped"]), summary["decision"], summary["shard_dir"],
            summary["manifest_sha256"], summary["source_table"], _i(summary["source_version"]),
            summary["output_dir"], summary["model"], summary["method"], summary["launcher"],
            int(summary["processes"]), _i(summary.get("steps")), _i(summary.get("resumed_from")),
            _f(summary.get("train_loss")), _f(summary.get("eval_loss")), per_cat,
            _f(summary.get("useful_tokens_per_s")), _f(summary.get("tokens_per_s")),
            _f(summary.get("padding_share")), summary.get("mlflow_run_id"), summary["fingerprint"])


def run(cfg: Config, spark, *, fn: str = DEFAULT_FN) -> dict:
    from dollyflow.core.training.runner import run_training
    from dollyflow.engine.delta import DeltaStore

    summary = run_training(cfg, spark, fn=fn)
    store = DeltaStore(spark, cfg.tables)
    store.append_rows([runs_row(summary)], RUNS_DDL, cfg.tables.train_runs, job="train", run_id=cfg.run_id)
    summary["train_runs"] = store.location(cfg.tables.train_runs)
    summary.pop("started_at", None)
    return summary


def main(argv: list[str] | None = None) -> int:
    from dollyflow.cli import run_job
    return run_job("train", argv)
