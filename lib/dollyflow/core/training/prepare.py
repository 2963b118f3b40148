"""The driver's side of a training run (engine-free): what to train on, where, and whether at all.

:func:`prepare` resolves the shard directory (a root's ``LATEST.json`` or a version directory),
verifies it against its manifest (a corrupted shard fails here, before anything is launched, and
the ranks check again before step 1), picks the output and checkpoint directories, computes the
run's *fingerprint* (manifest sha256, model, processes and every train key that changes the
weights) and decides:

- ``skip``: the output directory holds a finished model with the same fingerprint: nothing is
  launched or written (re-running the pipeline is a no-op);
- ``resume``: complete checkpoints of the same fingerprint exist: the ranks continue from the
  latest one;
- ``fresh``: nothing there (or ``train.overwrite=true``: the previous model and checkpoints in
  that directory are removed first);
- a different fingerprint in the directory fails, naming the fields that differ.

It returns the *spec*, the plain dict every rank's :func:`~dollyflow.core.training.loop.train_main`
receives. :func:`finish` completes the MLflow run after the ranks are done.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict

from dollyflow.config import Config, shards_root
from dollyflow.core import shards as shard_io
from dollyflow.core.storage import is_uri, join, read_bytes, write_atomic
from dollyflow.core.training import checkpoint, dsconfig, output, tracking

RUN_FILE = ".dollyflow-train.json"   # written at the start of a run: marks the directory as ours


class OutputConflict(RuntimeError):
    """The output directory holds a different training run."""


def on_databricks() -> bool:
    return "DATABRICKS_RUNTIME_VERSION" in os.environ


def resolve_processes(t) -> int:
    if t.processes:
        return int(t.processes)
    if t.launcher == "torch_distributor" and not t.local_mode:
        raise ValueError("train.processes: set the number of ranks for TorchDistributor's distributed mode "
                         "(local_mode=false); 0 (auto) only counts the driver's GPUs")
    try:
        import torch
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        n = 0
    return n or 1


def model_short_name(name: str) -> str:
    return os.path.basename(os.path.normpath(name)).lower() or "model"


def default_output_dir(cfg: Config, manifest_sha256: str) -> str:
    return (f"{cfg.tables.files_root()}/models/"
            f"{model_short_name(cfg.model.name)}-{cfg.train.method}-{manifest_sha256[:8]}")


def _require_file_path(path: str, key: str) -> str:
    if is_uri(path):
        raise ValueError(f"{key}: {path!r} is a URI, but DeepSpeed checkpoints and the model directory are "
                         "written as files by the ranks: use a local path or a mount every rank sees "
                         "(/Volumes/<catalog>/<schema>/<volume>/... or /dbfs/... on Databricks, NFS elsewhere)")
    return os.path.abspath(path)


def presets_for(t) -> dict:
    """The DeepSpeed presets the ranks may need, loaded here (ranks on executors may not see conf/)."""
    if t.deepspeed in dsconfig.PRESETS or t.deepspeed == "auto":
        return {name: dsconfig.load_preset(name) for name in dsconfig.PRESETS}
    return {t.deepspeed: dsconfig.load_preset(t.deepspeed)}


def _ours(directory: str) -> bool:
    return any(os.path.exists(os.path.join(directory, n))
               for n in (output.PROVENANCE, RUN_FILE, output.METRICS, "checkpoints"))


def _clear(directory: str, checkpoint_dir: str) -> None:
    if os.path.isdir(checkpoint_dir):
        shutil.rmtree(checkpoint_dir)
    if os.path.isdir(directory):
        shutil.rmtree(directory)


def prepare(cfg: Config, *, launcher: str | None = None) -> dict:
    """Resolve, verify and decide; returns ``{"decision": skip|resume|fresh, "spec": ..., ...}``."""
    t = cfg.train
    launcher = launcher or t.launcher
    shard_dir = shard_io.resolve_shard_dir(t.shard_dir or shards_root(cfg))
    problems = shard_io.verify_shards(shard_dir)
    if problems:
        raise shard_io_error(shard_dir, problems)
    manifest_bytes = read_bytes(join(shard_dir, shard_io.MANIFEST))
    manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
    manifest = json.loads(manifest_bytes)
    if "train" not in manifest["splits"]:
        raise ValueError(f"{shard_dir}: the manifest has no train split")
    processes = resolve_processes(t)
    out_dir = _require_file_path(t.output_dir or default_output_dir(cfg, manifest_sha), "train.output_dir")
    ckpt_dir = _require_file_path(t.checkpoint_dir or os.path.join(out_dir, "checkpoints"), "train.checkpoint_dir")
    train = asdict(t)
    fp = output.fingerprint(model_name=cfg.model.name, manifest_sha256=manifest_sha, train=train, processes=processes)
    base = {"shard_dir": shard_dir, "manifest_sha256": manifest_sha, "output_dir": out_dir,
            "checkpoint_dir": ckpt_dir, "fingerprint": fp, "processes": processes, "launcher": launcher,
            "source": manifest.get("source", {})}

    # what is in the output directory already
    prov = output.read_provenance(out_dir)
    ckpt = checkpoint.latest_complete(ckpt_dir)
    if t.overwrite and (prov or ckpt or (os.path.isdir(out_dir) and _ours(out_dir))):
        _clear(out_dir, ckpt_dir)
        prov, ckpt = None, None
    elif prov is not None:
        if prov.get("fingerprint", {}).get("sha256") == fp["sha256"]:
            return dict(base, decision="skip", spec=None, provenance=prov)
        diff = output.differences(prov.get("fingerprint", {}).get("fields", {}), fp["fields"])
        raise OutputConflict(f"{out_dir} holds a model trained with a different fingerprint ({'; '.join(diff)}); "
                             "set train.overwrite=true to replace it, or choose another train.output_dir")
    if ckpt is not None and ckpt.info.get("fingerprint") != fp["sha256"]:
        old = _read_run_file(out_dir)
        diff = output.differences(old.get("fingerprint", {}).get("fields", {}), fp["fields"]) if old else []
        raise OutputConflict(f"{ckpt_dir} holds checkpoints of a different training run "
                             f"({'; '.join(diff) or 'fingerprint ' + str(ckpt.info.get('fingerprint'))}); "
                             "set train.overwrite=true to discard them, or choose another train.output_dir")
    if prov is None and ckpt is None and os.path.isdir(out_dir) and os.listdir(out_dir) and not _ours(out_dir):
        raise OutputConflict(f"train.output_dir {out_dir} is not empty and not a dollyflow model directory; "
                             "choose another one")
    decision = "resume" if ckpt is not None else "fresh"
    os.makedirs(out_dir, exist_ok=True)
    write_atomic(os.path.join(out_dir, RUN_FILE), json.dumps(
        {"run_id": cfg.run_id, "fingerprint": fp, "shard_dir": shard_dir}, indent=2).encode())

    uri, experiment, mlflow_msg = tracking.resolve(train, cfg.tables.warehouse if not cfg.tables.catalog else "",
                                                    on_databricks())
    mlflow = None
    if uri:
        src = manifest.get("source", {})
        tags = {"dollyflow.job": "train", "dollyflow.run_id": cfg.run_id,
                "dataset.table": src.get("table", ""), "dataset.location": src.get("location", ""),
                "dataset.version": src.get("version", ""), "dataset.manifest_sha256": manifest_sha,
                "dataset.shard_dir": shard_dir, "fingerprint": fp["sha256"], "output_dir": out_dir,
                "base_model": cfg.model.name, "method": t.method, "decision": decision}
        params = {"model": asdict(cfg.model), "train": train, "processes": processes, "launcher": launcher}
        run_id = tracking.start_run(uri, experiment, cfg.run_id, params, tags)
        mlflow = {"uri": uri, "experiment": experiment, "run_id": run_id}
    spec = {"run_id": cfg.run_id, "train": train, "model": asdict(cfg.model), "config": cfg.to_dict(),
            "deepspeed_presets": presets_for(t), "mlflow": mlflow, **base}
    return dict(base, decision=decision, spec=spec, mlflow_message=mlflow_msg,
                resume_step=ckpt.step if ckpt else None)


def shard_io_error(shard_dir: str, problems: list[str]) -> Exception:
    from dollyflow.core.training.loop import ShardCheckError
    return ShardCheckError(f"shard directory {shard_dir} does not match its manifest: " + "; ".join(problems[:10]))


def _read_run_file(out_dir: str) -> dict:
    try:
        return json.loads(read_bytes(os.path.join(out_dir, RUN_FILE)))
    except (OSError, ValueError):
        return {}


def finish(plan: dict, result: dict | None, *, failed: bool = False) -> dict:
    """End the MLflow run (artifacts, metrics backfill, the model); returns what was logged."""
    spec = plan.get("spec") or {}
    mlf = spec.get("mlflow")
    if not mlf:
        return {}
    entries = output.read_metrics(os.path.join(plan["output_dir"], output.METRICS))
    backfill = failed or not (result or {}).get("mlflow_live", False)
    return tracking.finish_run(mlf["uri"], mlf["run_id"], output_dir=plan["output_dir"], entries=entries,
                               backfill=backfill,
                               log_model=bool(spec["train"]["mlflow_log_model"]) and not failed,
                               status="FAILED" if failed else "FINISHED")
