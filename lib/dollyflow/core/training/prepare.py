"""The driver's side of a training run (engine-free): what to train on, where, and whether at all.

:func:`prepare` resolves the shard directory (a root's ``LATEST.json`` or a version directory),
verifies it against its manifest (a corrupted shard fails here, before anything is launched, and
the ranks check again before step 1), checks that the shards' tokenizer is the base model's
(plus Dolly's added tokens), picks the output and checkpoint directories, computes the run's
*fingerprint* (manifest sha256, model, processes and every train key that changes the weights)
and decides, **fingerprint first**, whatever ``train.overwrite`` says:

- ``skip``: the output directory holds a finished model with the same fingerprint: nothing is
  launched or written (re-running the pipeline is a no-op);
- ``resume``: complete checkpoints of the same fingerprint exist: the ranks continue from the
  latest one (after checking its files against the sizes its marker recorded);
- ``fresh``: nothing of this fingerprint yet;
- a different fingerprint (a finished model, or checkpoints of another run) fails naming the
  fields that differ, unless ``train.overwrite=true``: then the new model is trained into a
  sibling directory ``<parent>/.<name>.next-<fingerprint>`` (a retry after preemption resumes
  there) and swapped in by :func:`finish` only once it is complete; the old model stays
  readable at ``train.output_dir`` until then, and a failed retrain leaves it in place.

Nothing is ever removed wholesale: the swap removes only what the project wrote (the files the
old model's provenance lists, checkpoints by their markers), and anything else in the output
directory (a user's own files) moves into the new one. The runner holds a lease on the output
directory (:mod:`.lease`) around all of this, so two train jobs never share one.

It returns the *spec*, the :class:`~.spec.TrainSpec` every rank's
:func:`~dollyflow.core.training.loop.train_main` receives. :func:`finish` swaps the new model in and completes the MLflow run after the ranks are done.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict

from dollyflow.config import Config, on_databricks, redact, redact_uri, shards_root
from dollyflow.core import shards as shard_io
from dollyflow.core.models.build import is_tiny
from dollyflow.core.prompt import DOLLY_SPECIAL_TOKENS
from dollyflow.core.storage import is_uri, join, read_bytes, write_atomic
from dollyflow.core.tokens import load_tokenizer
from dollyflow.core.training import checkpoint, dsconfig, model_dir, tracking
from dollyflow.core.training.data import local_dir
from dollyflow.core.training.errors import shard_check_error
from dollyflow.core.training.spec import TrainSpec

RUN_FILE = model_dir.RUN_FILE   # written at the start of a run: marks the directory as ours


class OutputConflict(RuntimeError):
    """The output directory holds a different training run."""


class TokenizerMismatch(ValueError):
    """The shards were tokenized with a tokenizer that is not the base model's."""


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
    """The model's part of the default output directory's name: a plain name (the last path
    segment of ``model.name``, lower-cased, anything but letters, digits and ``_ . -`` replaced),
    never ``.``, ``..`` or empty."""
    base = os.path.basename(os.path.normpath(str(name).rstrip("/"))).lower()
    base = re.sub(r"[^a-z0-9_.-]+", "-", base).strip(".-")
    return base or "model"


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
    """The directory was written by a dollyflow train run: its run file or a finished model's
    provenance is there. (A ``checkpoints/`` folder or a ``metrics.jsonl`` alone proves nothing.)"""
    return any(os.path.isfile(os.path.join(directory, n)) for n in (model_dir.PROVENANCE, RUN_FILE))


def check_tokenizer(shard_dir: str, model_cfg: dict) -> dict:
    """The shards' tokenizer must be the base model's, possibly plus the project's added tokens
    (Dolly's three special tokens): same ids for every token of the model's vocabulary, and
    nothing else added. Fails before training, naming both sizes. The tiny random model is built
    for whatever tokenizer the shards carry, so it needs no check."""
    base = model_cfg.get("tokenizer") or model_cfg["name"]
    if is_tiny(model_cfg["name"]) and not model_cfg.get("tokenizer"):
        return {"checked": False, "why": "the tiny model is built for the shards' tokenizer"}
    shard_tok = load_tokenizer(local_dir(join(shard_dir, shard_io.TOKENIZER_DIR)), dolly_tokens=False)
    try:
        model_tok = load_tokenizer(base, dolly_tokens=False)
    except Exception as exc:  # noqa: BLE001 - named in the error
        if is_tiny(model_cfg["name"]):
            return {"checked": False, "why": f"model.tokenizer {base!r} cannot be loaded ({exc}); the tiny model "
                                             "is built for the shards' tokenizer"}
        raise TokenizerMismatch(f"cannot load the base model's tokenizer {base!r} to check the shards against it: "
                                f"{type(exc).__name__}: {exc}") from exc
    n_shard, n_model = len(shard_tok), len(model_tok)
    model_vocab, shard_vocab = model_tok.get_vocab(), shard_tok.get_vocab()
    added = [t for t in DOLLY_SPECIAL_TOKENS if t not in model_vocab]
    differs = [t for t, i in model_vocab.items() if shard_vocab.get(t) != i]
    extra = sorted(set(shard_vocab) - set(model_vocab) - set(DOLLY_SPECIAL_TOKENS))
    if differs or extra or n_shard not in (n_model, n_model + len(added)):
        raise TokenizerMismatch(
            f"the shards in {shard_dir} were tokenized with a {n_shard:,}-token vocabulary, but the base model "
            f"{model_cfg['name']!r} has {n_model:,} tokens ({n_model + len(added):,} with the project's "
            f"{len(added)} added tokens){f'; {len(differs):,} of its tokens have other ids' if differs else ''}: "
            "re-run tokenize with this model's tokenizer (tokenize.tokenizer / model.tokenizer), or train the "
            "model the shards were made for")
    return {"checked": True, "shard_tokens": n_shard, "model_tokens": n_model}


def sibling_dir(out_dir: str, fingerprint: str, kind: str = "next") -> str:
    """``<parent>/.<name>.<kind>-<fingerprint[:16]>``: where a replacement model is trained
    (``next``) or the replaced one waits to be cleared (``prev``)."""
    parent, name = os.path.split(os.path.normpath(out_dir))
    return os.path.join(parent, f".{name}.{kind}-{fingerprint[:16]}")


def _conflict(out_dir: str, ckpt_dir: str, prov: dict | None, fp: dict) -> str | None:
    """What in ``out_dir`` (or its checkpoints) belongs to a different fingerprint, or None."""
    if prov is not None:
        if prov.get("fingerprint", {}).get("sha256") == fp["sha256"]:
            return None
        diff = model_dir.differences(prov.get("fingerprint", {}).get("fields", {}), fp["fields"])
        return f"{out_dir} holds a model trained with a different fingerprint ({'; '.join(diff)})"
    others = [c for c in checkpoint.list_checkpoints(ckpt_dir)
              if c.complete and c.info.get("fingerprint") != fp["sha256"]]
    if others and checkpoint.latest_complete(ckpt_dir, fp["sha256"]) is None:
        old = _read_run_file(out_dir)
        diff = model_dir.differences(old.get("fingerprint", {}).get("fields", {}), fp["fields"]) if old else []
        return (f"{ckpt_dir} holds checkpoints of a different training run "
                f"({'; '.join(diff) or 'fingerprint ' + str(others[-1].info.get('fingerprint'))})")
    return None


def prepare(cfg: Config, *, launcher: str | None = None) -> dict:
    """Resolve, verify and decide; returns ``{"decision": skip|resume|fresh, "spec": ..., ...}``.
    Callers that may run concurrently with another train job hold the output directory's lease
    (:class:`~dollyflow.core.training.lease.Lease`, as :func:`dollyflow.jobs.train.run_training` does)."""
    t = cfg.train
    launcher = launcher or t.launcher
    shard_dir = shard_io.resolve_shard_dir(t.shard_dir or shards_root(cfg))
    problems = shard_io.verify_shards(shard_dir)
    if problems:
        raise shard_check_error(shard_dir, problems)
    base = identify(cfg, launcher, shard_dir)
    manifest_sha, fp, processes = base["manifest_sha256"], base["fingerprint"], base["processes"]
    manifest = shard_io.read_manifest(shard_dir)
    out_dir = _require_file_path(base["output_dir"], "train.output_dir")
    base["output_dir"] = out_dir
    train = asdict(t)

    # fingerprint first: the same model finished already is a no-op, overwrite or not
    prov = model_dir.read_provenance(out_dir)
    if prov is not None and prov.get("fingerprint", {}).get("sha256") == fp["sha256"]:
        ckpt_dir = _require_file_path(t.checkpoint_dir or os.path.join(out_dir, "checkpoints"), "train.checkpoint_dir")
        return dict(base, checkpoint_dir=ckpt_dir, target_dir=out_dir, decision="skip", spec=None, provenance=prov)
    vocab = check_tokenizer(shard_dir, asdict(cfg.model))
    default_ckpt = os.path.join(out_dir, "checkpoints")
    conflict = _conflict(out_dir, _require_file_path(t.checkpoint_dir or default_ckpt, "train.checkpoint_dir"),
                         prov, fp)
    if conflict and not t.overwrite:
        raise OutputConflict(f"{conflict}; set train.overwrite=true to train the new model beside it and replace "
                             "it once complete, or choose another train.output_dir")
    target = sibling_dir(out_dir, fp["sha256"]) if conflict else out_dir
    ckpt_dir = _require_file_path(t.checkpoint_dir or os.path.join(target, "checkpoints"), "train.checkpoint_dir")
    if not conflict and prov is None and os.path.isdir(out_dir) and os.listdir(out_dir) and not _ours(out_dir) \
            and checkpoint.latest_complete(ckpt_dir, fp["sha256"]) is None:
        raise OutputConflict(f"train.output_dir {out_dir} is not empty and not a dollyflow model directory "
                             f"(it holds {', '.join(sorted(os.listdir(out_dir))[:5])}); choose another one")
    ckpt = checkpoint.latest_complete(ckpt_dir, fp["sha256"])
    if ckpt is not None:
        problems = checkpoint.quick_check(ckpt)
        if problems:
            raise checkpoint.refusal(ckpt, problems)
    decision = "resume" if ckpt is not None else "fresh"
    os.makedirs(target, exist_ok=True)
    write_atomic(os.path.join(target, RUN_FILE), json.dumps(
        {"run_id": cfg.run_id, "fingerprint": fp, "shard_dir": redact_uri(shard_dir), "output_dir": out_dir},
        indent=2).encode())
    base.update(checkpoint_dir=ckpt_dir, target_dir=target, replaces=out_dir if conflict else None,
                replaced_fingerprint=(prov or {}).get("fingerprint", {}).get("sha256") if conflict else None)

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
        run_id = tracking.start_run(uri, experiment, cfg.run_id, redact(params), redact(tags))
        mlflow = {"uri": uri, "experiment": experiment, "run_id": run_id}
    spec = TrainSpec.from_dict({
        "run_id": cfg.run_id, "train": train, "model": asdict(cfg.model), "config": cfg.redacted(),
        "deepspeed_presets": presets_for(t), "mlflow": mlflow, "shard_dir": shard_dir,
        "manifest_sha256": manifest_sha, "output_dir": target, "final_output_dir": out_dir,
        "checkpoint_dir": ckpt_dir, "fingerprint": fp, "processes": processes, "launcher": launcher})
    return dict(base, decision=decision, spec=spec, mlflow_message=mlflow_msg, vocab=vocab,
                resume_step=ckpt.step if ckpt else None)


def identify(cfg: Config, launcher: str | None = None, shard_dir: str | None = None) -> dict:
    """What a run of ``cfg`` is, without verifying or writing anything: the shard directory, its
    manifest's sha256 and source, the processes, the output directory as configured (a URI
    stays one) and the fingerprint."""
    t = cfg.train
    shard_dir = shard_dir or shard_io.resolve_shard_dir(t.shard_dir or shards_root(cfg))
    manifest_sha = shard_io.manifest_sha256(shard_dir)
    manifest = shard_io.read_manifest(shard_dir)
    if "train" not in manifest["splits"]:
        raise ValueError(f"{shard_dir}: the manifest has no train split")
    processes = resolve_processes(t)
    fp = model_dir.fingerprint(model_name=cfg.model.name, manifest_sha256=manifest_sha, train=asdict(t),
                               processes=processes)
    return {"shard_dir": shard_dir, "manifest_sha256": manifest_sha, "fingerprint": fp, "processes": processes,
            "output_dir": t.output_dir or default_output_dir(cfg, manifest_sha), "launcher": launcher or t.launcher,
            "source": manifest.get("source", {})}


def remote_output(cfg: Config) -> str | None:
    """The output directory when it is an object-store URI (trained in a staging directory and
    uploaded: :mod:`.remote`), else None."""
    if cfg.train.output_dir:
        return cfg.train.output_dir if is_uri(cfg.train.output_dir) else None
    root = cfg.tables.files_root()
    return identify(cfg)["output_dir"] if is_uri(root) else None


def _read_run_file(out_dir: str) -> dict:
    try:
        return json.loads(read_bytes(os.path.join(out_dir, RUN_FILE)))
    except (OSError, ValueError):
        return {}


def output_dir_for(cfg: Config) -> str:
    """The output directory a run of ``cfg`` writes (absolute): ``train.output_dir``, else the
    default under the files root, named after the shards' manifest (read, not verified)."""
    if cfg.train.output_dir:
        return _require_file_path(cfg.train.output_dir, "train.output_dir")
    shard_dir = shard_io.resolve_shard_dir(cfg.train.shard_dir or shards_root(cfg))
    sha = shard_io.manifest_sha256(shard_dir)
    default = default_output_dir(cfg, sha)
    if is_uri(default):
        raise ValueError(f"train.output_dir is empty and its default {redact_uri(default)!r} follows the files "
                         f"root (tables.warehouse={redact_uri(cfg.tables.warehouse)!r}), a URI; but DeepSpeed "
                         "checkpoints and the model directory are written as files by the ranks: set "
                         "train.output_dir to a path every rank and the driver see (on a cluster a mount on "
                         "every node, declared in tables.shared_mounts; /Volumes/... on Databricks), or put the "
                         "warehouse itself on such a mount")
    return _require_file_path(default, "train.output_dir")


def checkpoint_dir_for(cfg: Config, out_dir: str) -> str:
    """The checkpoint directory a run writing ``out_dir`` uses (absolute; replacements may
    use a sibling of ``out_dir``, which lies on the same mount)."""
    return _require_file_path(cfg.train.checkpoint_dir or os.path.join(out_dir, "checkpoints"),
                              "train.checkpoint_dir")


def finish(plan: dict, result: dict | None, *, failed: bool = False) -> dict:
    """After the ranks: on success, a replacement model (trained beside the old one) is swapped
    in (:func:`~.model_dir.swap_in`: the old model's own files removed, a user's files carried
    over) and checkpoints of the replaced run are removed by their markers; then the MLflow run
    ends (artifacts, metrics backfill, the model). A failed run changes nothing: the old model
    stays, and the replacement's checkpoints stay beside it for a retry to resume from.
    Returns ``{"mlflow": what was logged, "swap": ..., "checkpoint_dir": where they are now}``."""
    spec: TrainSpec | None = plan.get("spec")
    out, target = plan["output_dir"], plan.get("target_dir") or plan["output_dir"]
    ckpt_dir, swap = plan["checkpoint_dir"], None
    if not failed and plan.get("replaces"):
        fp = plan["fingerprint"]["sha256"]
        swap = model_dir.swap_in(target, out, sibling_dir(out, fp, "prev"))
        if os.path.normpath(ckpt_dir).startswith(os.path.normpath(target) + os.sep):
            ckpt_dir = os.path.join(out, os.path.relpath(ckpt_dir, target))
        else:     # a checkpoint_dir of the user's: only the replaced run's checkpoints go
            swap["checkpoints_removed"], kept = checkpoint.remove_other_runs(ckpt_dir, fp)
            if kept:
                swap["checkpoints_kept"] = kept
    written = target if failed else out
    mlf = spec.mlflow if spec else None
    logged = {}
    if mlf:
        entries = model_dir.read_metrics(os.path.join(written, model_dir.METRICS))
        backfill = failed or not (result or {}).get("mlflow_live", False)
        logged = tracking.finish_run(mlf.uri, mlf.run_id, output_dir=written, entries=entries,
                                     backfill=backfill,
                                     log_model=spec.train.mlflow_log_model and not failed,
                                     status="FAILED" if failed else "FINISHED")
    return {"mlflow": logged, "swap": swap, "checkpoint_dir": ckpt_dir}
