"""train: fine-tune the model on the tokenize job's shards; one row per run -> ``train_runs``.

The loop (:mod:`dollyflow.core.training`) is engine-free; this job prepares the run, picks the
launcher that starts the loop on every rank (``train.launcher``: TorchDistributor by default,
torchrun, Horovod: :func:`launch`, as a datatrove script picks its executor), finishes the run
and records it:

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

:func:`run` is the job (with Spark: the ``train_runs`` row); :func:`run_without_spark` is the
same run on this machine's ranks with torchrun and no Delta row (``dollyflow train --no-spark``,
``python -m dollyflow.launch.torchrun``).
"""
from __future__ import annotations

import copy
import os
import time
from datetime import datetime, timezone

from dollyflow.config import Config, redact, redact_uri
from dollyflow.core.storage import check_reachable, is_uri, join
from dollyflow.core.training import model_dir, remote
from dollyflow.core.training.lease import Lease
from dollyflow.core.training.model_dir import verify_complete
from dollyflow.core.training.prepare import (OutputConflict, checkpoint_dir_for, finish, identify, output_dir_for,
                                             prepare, remote_output)
from dollyflow.core.training.spec import TrainSpec
from dollyflow.engine.delta import DeltaStore
from dollyflow.engine.session import master_of
from dollyflow.launch import horovod, torch_distributor, torchrun
from dollyflow.launch.common import DEFAULT_FN

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
    summary = run_training(cfg, spark, fn=fn)
    store = DeltaStore(spark, cfg.tables)
    store.append_rows([runs_row(summary)], RUNS_DDL, cfg.tables.train_runs, job="train", run_id=cfg.run_id)
    summary["train_runs"] = store.location(cfg.tables.train_runs)
    summary.pop("started_at", None)
    return summary


def run_without_spark(cfg: Config) -> dict:
    """The train job on this machine without Spark: the ranks are started by torchrun whatever
    ``train.launcher`` says (the other launchers run on Spark), no ``train_runs`` row."""
    cfg.train.launcher = "torchrun"
    return run_training(cfg, None)


def launch(spec: TrainSpec, *, spark=None, fn: str = DEFAULT_FN) -> dict:
    """Run ``fn(spec)`` on ``spec.processes`` ranks with the launcher ``spec.launcher``; rank 0's result."""
    name = spec.launcher
    if name == "torchrun":
        return torchrun.launch(spec, fn=fn)
    if name == "torch_distributor":
        return torch_distributor.launch(spec, spark=spark, fn=fn)
    if name == "horovod":
        return horovod.launch(spec, spark=spark, fn=fn)
    raise ValueError(f"train.launcher: unknown launcher {name!r}")


def run_training(cfg: Config, spark=None, *, fn: str = DEFAULT_FN) -> dict:
    """Train per ``cfg`` (or skip): prepare, launch, finish; returns the job summary (without the
    ``train_runs`` row). ``fn`` is the per-rank function (``module:function``),
    :func:`~dollyflow.core.training.loop.train_main` unless a caller wraps it. The output
    directory's lease is held throughout: a second train job for the same directory fails at
    once, naming this run. An object-store output directory is trained in a local staging
    directory and uploaded (:func:`run_to_uri`)."""
    uri = remote_output(cfg)
    if uri is not None:
        return run_to_uri(cfg, uri, spark, fn=fn)
    return _run_local(cfg, spark, fn=fn)


def run_to_uri(cfg: Config, uri: str, spark=None, *, fn: str = DEFAULT_FN) -> dict:
    """Train for an output directory on an object store (:mod:`~dollyflow.core.training.remote`):
    the model the URI holds already (its upload manifest of the same fingerprint) is a no-op; one
    of another fingerprint fails unless ``train.overwrite``; else the ranks train in the staging
    directory (resuming from its checkpoints), the driver uploads it with the manifest last and
    verifies every uploaded file before reporting the URI."""
    t = cfg.train
    if t.checkpoint_dir:
        raise ValueError(f"train.checkpoint_dir: {redact_uri(t.checkpoint_dir)!r} cannot be set with an object-store "
                         f"train.output_dir ({redact_uri(uri)}): checkpoints are staged with the model and uploaded "
                         "to <output_dir>/checkpoints; leave it empty")
    if t.launcher != "torchrun" and not t.local_mode:
        raise ValueError(f"train.output_dir {redact_uri(uri)} is an object-store URI: the model is staged on the "
                         "driver's disk and uploaded from there, so the ranks must run on the driver "
                         "(train.local_mode=true); for ranks on executors give a train.output_dir on a mount "
                         "every node sees")
    t0 = time.time()
    ident = identify(cfg)
    fp = ident["fingerprint"]["sha256"]
    staging = remote.staging_dir(uri, t.staging_dir)
    held = remote.published(uri)
    if held is not None and held.get("fingerprint") == fp:
        prov = model_dir.read_provenance(uri) or {}
        summary = {"job": "train", "run_id": cfg.run_id, "skipped": True, "decision": "skip",
                   "shard_dir": ident["shard_dir"], "manifest_sha256": ident["manifest_sha256"],
                   "source_table": ident["source"].get("table", ""), "source_version": ident["source"].get("version"),
                   "output_dir": uri, "checkpoint_dir": join(uri, "checkpoints"), "method": t.method,
                   "launcher": ident["launcher"], "processes": ident["processes"], "model": cfg.model.name,
                   "fingerprint": fp, "lease_taken_over_from": None, "staging_dir": staging}
        summary.update(_metrics_summary(prov.get("metrics", {})), mlflow_run_id=prov.get("mlflow_run_id"),
                       resumed_from=None, started_at=t0, job_seconds=round(time.time() - t0, 2),
                       message=f"{redact_uri(uri)} already holds this model (same manifest and training config): "
                               "nothing to do")
        print(f"[dollyflow train] {summary['message']}", flush=True)
        return summary
    if held is not None and not t.overwrite:
        old = model_dir.read_provenance(uri) or {}
        diff = model_dir.differences(old.get("fingerprint", {}).get("fields", {}), ident["fingerprint"]["fields"])
        raise OutputConflict(f"{redact_uri(uri)} holds a model trained with a different fingerprint "
                             f"({'; '.join(diff) or held.get('fingerprint')}); set train.overwrite=true to replace "
                             "it, or choose another train.output_dir")
    remote.prepare_staging(uri, staging, fp)
    local = copy.deepcopy(cfg)
    local.train.output_dir = staging
    summary = _run_local(local, spark, fn=fn)
    print(f"[dollyflow train] uploading {staging} to {redact_uri(uri)}", flush=True)
    t1 = time.time()
    manifest = remote.publish(staging, uri, fp)
    remote.check_published(uri, fp)
    ckpt = summary.get("checkpoint_dir")
    if ckpt and os.path.normpath(ckpt).startswith(os.path.normpath(staging) + os.sep):
        ckpt = join(uri, os.path.relpath(ckpt, staging))
    summary.update(output_dir=uri, checkpoint_dir=ckpt, staging_dir=staging, uploaded_files=len(manifest["files"]),
                   upload_seconds=round(time.time() - t1, 2), replaced=summary.get("replaced") or bool(held),
                   adapter_dir=_remote_path(summary.get("adapter_dir"), staging, uri))
    return summary


def _remote_path(path: str | None, staging: str, uri: str) -> str | None:
    if not path or is_uri(path):
        return path
    rel = os.path.relpath(path, staging)
    return path if rel.startswith("..") else join(uri, rel)


def _run_local(cfg: Config, spark=None, *, fn: str = DEFAULT_FN) -> dict:
    t0 = time.time()
    if spark is not None:
        check_rank_paths(cfg, master_of(spark))
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
        spec: TrainSpec = plan["spec"]
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
        verify_complete(plan["output_dir"])   # the ranks' files where the driver reports them
    m = result["metrics"]
    summary.update(_metrics_summary(m), resumed_from=m.get("resumed_from"),
                   mlflow_run_id=spec.mlflow.run_id if spec.mlflow else None, mlflow=done["mlflow"] or None,
                   replaced=done["swap"], checkpoint_dir=done["checkpoint_dir"],
                   weights=result.get("weights"), adapter_dir=_final_path(result.get("adapter_dir"), plan),
                   deepspeed_preset=result.get("deepspeed_preset"), zero_stage=result.get("zero_stage"),
                   precision=result.get("precision"), started_at=t0, job_seconds=round(time.time() - t0, 2))
    return summary


def ranks_elsewhere(cfg: Config) -> bool:
    """Whether the ranks may run on other hosts than the driver: TorchDistributor's distributed
    mode (``train.local_mode=false``) and Horovod on Spark start them on executors."""
    t = cfg.train
    return (t.launcher == "torch_distributor" and not t.local_mode) or t.launcher == "horovod"


def check_rank_paths(cfg: Config, master: str) -> None:
    """Refuse, before anything runs, an output or checkpoint directory the ranks on other hosts
    and the driver would not all see: on a master that is not ``local[...]`` with ranks on the
    executors, ``train.output_dir`` (or its default under the files root) and
    ``train.checkpoint_dir`` must be URIs or lie under a Databricks mount or a mount declared in
    ``tables.shared_mounts`` (the error names the key). Ranks on the driver (local mode) write
    its own disk, which it sees."""
    if not ranks_elsewhere(cfg):
        return
    out = output_dir_for(cfg)
    mounts = cfg.tables.shared_mounts
    key = "train.output_dir" if cfg.train.output_dir else \
        f"train.output_dir (empty: its default under the files root, tables.warehouse={cfg.tables.warehouse!r})"
    check_reachable(out, master, what=key, shared_mounts=mounts)
    check_reachable(checkpoint_dir_for(cfg, out), master, what="train.checkpoint_dir", shared_mounts=mounts)


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
