"""tokenize: silver -> the ``tokenized`` Delta table and training shards with a manifest.

Each silver record becomes Dolly's training prompt, encoded with the model's tokenizer plus
Dolly's special tokens (pad = eos); the loss counts only the response and ``### End``
(``response_start`` is the first such token). Prompts longer than ``max_length`` are dropped,
never truncated, and counted by reason. Records are split train/test by hash of record_id and
seed. Output:

- the ``tokenized`` table (overwritten): record_id, split, category, input_ids, response_start, length;
- a shard directory (default ``<warehouse>/shards/<silver table>-v<silver version>``): per split,
  Parquet shards balanced by tokens, ``manifest.json`` and the ``tokenizer/`` used. The trainer
  needs only this directory (:class:`dollyflow.core.shards.ShardDataset`).

Shards are written by the executors themselves, so on a multi-node cluster the shard directory
must be shared storage: a ``/dbfs`` or ``/Volumes`` path, or a pyarrow filesystem URI. All of it is
written to a staging directory first and swapped into place only once complete.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

from dollyflow.config import Config


def resolve_settings(cfg: Config) -> dict:
    """Tokenizer name and max_length, defaulting to the model's."""
    tk = cfg.tokenize
    max_length = tk.max_length if tk.max_length is not None else cfg.model.max_length
    if max_length is None or int(max_length) < 1:
        raise ValueError(f"tokenize.max_length must be a positive int, got {max_length!r}")
    return {"tokenizer": tk.tokenizer or cfg.model.tokenizer_name, "max_length": int(max_length)}


def shard_dir_for(cfg: Config, silver_version: int) -> str:
    """``tokenize.output_dir`` when set, else ``<warehouse>/shards/<silver>-v<version>``."""
    if cfg.tokenize.output_dir:
        out = cfg.tokenize.output_dir
    else:
        wh = cfg.tables.warehouse
        out = f"{wh.rstrip('/')}/shards/{cfg.tables.silver}-v{int(silver_version)}"
    return out if "://" in out else os.path.abspath(out)


def _save_tokenizer(tok, target: str) -> dict:
    """Save the tokenizer under ``target`` (local or URI) and describe it."""
    from dollyflow.core.storage import save_with
    from dollyflow.core.tokens import save_tokenizer

    info: dict = {}
    save_with(target, lambda d: info.update(save_tokenizer(tok, d)))
    info["dir"] = target
    return info


def _replace_dir(staging: str, final: str) -> None:
    """Swap the finished staging directory into place (the old shards go only once the new are
    complete)."""
    if "://" in final:
        from pyarrow import fs as pafs
        filesystem, root = pafs.FileSystem.from_uri(final)
        _, sroot = pafs.FileSystem.from_uri(staging)
        filesystem.delete_dir_contents(root, missing_dir_ok=True)
        filesystem.move(sroot, root)
        return
    old = None
    if os.path.exists(final):
        old = f"{final}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    os.rename(staging, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _build(cfg: Config, spark, store, silver_version: int, staging: str, settings: dict) -> dict:
    """Tokenize silver at ``silver_version``, write the ``tokenized`` table and everything of the
    shard directory (tokenizer, shards, manifest) under ``staging``; return the manifest."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from dollyflow.core.shards import TOKENIZER_DIR, build_manifest, histogram_edges, shard_count, write_manifest
    from dollyflow.core.tokens import load_tokenizer
    from dollyflow.engine.tokenize import (TABLE_COLUMNS, assign_split, drop_counts, plan_shards,
                                           tokenize_records, with_parallelism, write_shards)

    t, tk = cfg.tables, cfg.tokenize
    max_length = settings["max_length"]
    # The tokenizer: loaded once on the driver and saved next to the shards; the workers rebuild
    # it from exactly the saved tokenizer.json.
    tok = load_tokenizer(settings["tokenizer"])
    tok_info = _save_tokenizer(tok, f"{staging}/{TOKENIZER_DIR}")
    tok_info.update(name=settings["tokenizer"], dir=TOKENIZER_DIR)
    tokenizer_json = tok.backend_tokenizer.to_str()
    if "://" not in staging:
        tokenizer_json = (Path(staging) / TOKENIZER_DIR / "tokenizer.json").read_text(encoding="utf-8")

    silver = with_parallelism(store.read(t.silver, silver_version))
    tokenized = tokenize_records(silver, tokenizer_json, max_length, tk.seed).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        kept_count, drops = drop_counts(tokenized)
        if kept_count == 0:
            raise RuntimeError(f"no record of silver v{silver_version} can be tokenized (drops: {drops})")
        kept = tokenized.where(F.col("drop_reason").isNull())
        with_split = assign_split(kept, tk.test_size, kept_count)
        tokenized_version = store.write(with_split.select(*TABLE_COLUMNS), t.tokenized, mode="overwrite",
                                        job="tokenize", run_id=cfg.run_id)
        split_records = {r["split"]: int(r["count"]) for r in with_split.groupBy("split").count().collect()}
        shard_counts = {s: shard_count(tk.num_shards, n) for s, n in split_records.items()}
        edges = histogram_edges(max_length)
        stats = write_shards(with_split, plan_shards(with_split, tk.num_shards), staging, shard_counts, edges,
                             records=kept_count)
    finally:
        tokenized.unpersist()

    by_split: dict[str, list[dict]] = {s: [] for s in split_records}
    for st in stats:
        by_split[st["split"]].append(st)
    source = {"table": t.silver, "location": store.location(t.silver), "version": silver_version,
              "backend": store.backend}
    manifest = build_manifest(source=source, tokenizer=tok_info, max_length=max_length, seed=tk.seed,
                              test_size=tk.test_size, edges=edges, split_shards=by_split, drops=drops,
                              run_id=cfg.run_id)
    manifest["tokenized_table"] = {"table": t.tokenized, "location": store.location(t.tokenized),
                                   "version": int(tokenized_version)}
    write_manifest(staging, manifest)
    return manifest


def run(cfg: Config, spark) -> dict:
    from dollyflow.core.shards import export_mds, mds_available
    from dollyflow.core.storage import remove_dir
    from dollyflow.engine.delta import DeltaStore

    t0 = time.time()
    t, tk = cfg.tables, cfg.tokenize
    if tk.mds and not mds_available():
        raise RuntimeError("tokenize.mds=true needs the mosaicml-streaming package (pip install "
                           "mosaicml-streaming), which cannot be imported here")
    settings = resolve_settings(cfg)
    store = DeltaStore(spark, cfg.tables)
    silver_version = tk.silver_version if tk.silver_version is not None else store.version(t.silver)
    if silver_version is None:
        raise RuntimeError(f"silver table {store.location(t.silver)} does not exist: run dedupe first")
    silver_version = int(silver_version)
    shard_dir = shard_dir_for(cfg, silver_version)
    staging = f"{shard_dir}.staging-{uuid.uuid4().hex[:8]}"
    try:
        manifest = _build(cfg, spark, store, silver_version, staging, settings)
    except BaseException:
        remove_dir(staging)
        raise
    _replace_dir(staging, shard_dir)
    mds = export_mds(shard_dir) if tk.mds else None
    splits = manifest["splits"]
    kept = manifest["records"]
    return {
        "job": "tokenize", "run_id": cfg.run_id,
        "silver": store.location(t.silver), "silver_version": silver_version,
        "tokenized": manifest["tokenized_table"]["location"],
        "tokenized_version": manifest["tokenized_table"]["version"],
        "shard_dir": shard_dir, "tokenizer": settings["tokenizer"],
        "tokenizer_sha256": manifest["tokenizer"]["sha256"], "max_length": settings["max_length"],
        "records_in": kept + sum(manifest["drops"].values()),
        "records": {s: v["records"] for s, v in splits.items()},
        "tokens": {s: v["tokens"] for s, v in splits.items()},
        "shards": {s: len(v["shards"]) for s, v in splits.items()},
        "drops": manifest["drops"], "mds": mds, "job_seconds": round(time.time() - t0, 2),
    }


def main(argv: list[str] | None = None) -> int:
    from dollyflow.cli import run_job
    return run_job("tokenize", argv)
