"""tokenize: silver -> the ``tokenized`` Delta table and training shards with a manifest.

Each silver record becomes Dolly's training prompt, encoded with the model's tokenizer plus
Dolly's special tokens (pad = eos); the loss counts only the response and ``### End``
(``response_start`` is the first such token). Prompts longer than ``max_length`` are dropped,
never truncated, and counted by reason. Records are split train/test by hash of record_id and
seed. Output:

- the ``tokenized`` table (overwritten): record_id, split, category, input_ids, response_start, length;
- a new shard directory ``<shards root>/v<silver version>-<run id>/``: per split, Parquet shards
  balanced by tokens, ``manifest.json`` and the ``tokenizer/`` used. The trainer needs only this
  directory (:class:`dollyflow.core.shards.ShardDataset`), or the root, whose ``LATEST.json``
  names the newest complete one (:func:`dollyflow.core.shards.resolve_shard_dir`);
- one row in ``tokenize_runs`` (silver version, shard directory, manifest sha256, counts).

The shards root (:func:`dollyflow.config.shards_root`) is ``<warehouse>/shards/<silver>`` locally
and on clusters (where the warehouse must be a shared URI), ``/Volumes/<catalog>/<schema>/<volume>
/shards/<silver>`` on Databricks. Executors write the shards themselves, so a plain local path is
refused when they may run on other hosts. The new directory is verified against its manifest
before the pointer moves to it; older versions beyond ``tokenize.keep_versions`` are pruned only
after that, so a failed run never costs the previous shards (no delete-then-move, which object
stores cannot do atomically).
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

from dollyflow.config import Config


def resolve_settings(cfg: Config) -> dict:
    """Tokenizer name and max_length, defaulting to the model's."""
    tk = cfg.tokenize
    max_length = tk.max_length if tk.max_length is not None else cfg.model.max_length
    if max_length is None or int(max_length) < 1:
        raise ValueError(f"tokenize.max_length must be a positive int, got {max_length!r}")
    return {"tokenizer": tk.tokenizer or cfg.model.tokenizer_name, "max_length": int(max_length)}


def _save_tokenizer(tok, target: str) -> dict:
    """Save the tokenizer under ``target`` (local or URI) and describe it."""
    from dollyflow.core.storage import save_with
    from dollyflow.core.tokens import save_tokenizer

    info: dict = {}
    save_with(target, lambda d: info.update(save_tokenizer(tok, d)))
    info["dir"] = target
    return info


def _build(cfg: Config, spark, store, silver_version: int, staging: str, settings: dict) -> dict:
    """Tokenize silver at ``silver_version``, write the ``tokenized`` table and everything of the
    shard directory (tokenizer, shards, manifest) into the new directory ``staging``; return the
    manifest."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from dollyflow.core.shards import TOKENIZER_DIR, build_manifest, histogram_edges, shard_count, write_manifest
    from dollyflow.core.storage import is_uri, join
    from dollyflow.core.tokens import load_tokenizer
    from dollyflow.engine.tokenize import (TABLE_COLUMNS, assign_split, drop_counts, plan_shards,
                                           tokenize_records, with_parallelism, write_shards)

    t, tk = cfg.tables, cfg.tokenize
    max_length = settings["max_length"]
    # The tokenizer: loaded once on the driver and saved next to the shards; the workers rebuild
    # it from exactly the saved tokenizer.json.
    tok = load_tokenizer(settings["tokenizer"])
    tok_info = _save_tokenizer(tok, join(staging, TOKENIZER_DIR))
    tok_info.update(name=settings["tokenizer"], dir=TOKENIZER_DIR)
    tokenizer_json = tok.backend_tokenizer.to_str()
    if not is_uri(staging):
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


RUNS_DDL = ("run_id string, started_at timestamp, finished_at timestamp, silver_version long, "
            "shards_root string, shard_dir string, manifest_sha256 string, tokenizer_sha256 string, "
            "max_length int, records map<string,long>, tokens map<string,long>, drops map<string,long>, "
            "tokenized_version long, pruned array<string>")


def run(cfg: Config, spark) -> dict:
    from datetime import datetime, timezone

    from dollyflow.config import shards_root
    from dollyflow.core.shards import (MANIFEST, export_mds, mds_available, prune_versions, verify_shards,
                                       version_dir_name, write_pointer)
    from dollyflow.core.storage import absolute, check_reachable, join, read_bytes, remove_dir
    from dollyflow.engine.delta import DeltaStore
    from dollyflow.engine.session import master_of

    t0 = time.time()
    started = datetime.now(timezone.utc)
    t, tk = cfg.tables, cfg.tokenize
    if tk.mds and not mds_available():
        raise RuntimeError("tokenize.mds=true needs the mosaicml-streaming package (pip install "
                           "mosaicml-streaming), which cannot be imported here")
    settings = resolve_settings(cfg)
    root = absolute(shards_root(cfg))
    check_reachable(root, master_of(spark), tk.allow_local_output, "tokenize.output_dir (shards root)")
    store = DeltaStore(spark, cfg.tables)
    silver_version = tk.silver_version if tk.silver_version is not None else store.version(t.silver)
    if silver_version is None:
        raise RuntimeError(f"silver table {store.location(t.silver)} does not exist: run dedupe first")
    silver_version = int(silver_version)
    # A new directory per run; the root's pointer moves to it only once it is complete and
    # verified, and nothing of an earlier version is touched before that.
    name = version_dir_name(silver_version, cfg.run_id)
    shard_dir = join(root, name)
    try:
        manifest = _build(cfg, spark, store, silver_version, shard_dir, settings)
        problems = verify_shards(shard_dir)
        if problems:
            raise RuntimeError(f"the shards just written to {shard_dir} do not match their manifest: "
                               + "; ".join(problems[:10]))
    except BaseException:
        remove_dir(shard_dir)
        raise
    manifest_sha = hashlib.sha256(read_bytes(join(shard_dir, MANIFEST))).hexdigest()
    write_pointer(root, name, run_id=cfg.run_id, silver_version=silver_version, manifest_sha256=manifest_sha)
    pruned = prune_versions(root, keep=tk.keep_versions, protect=(name,))
    mds = export_mds(shard_dir) if tk.mds else None
    splits = manifest["splits"]
    records = {s: v["records"] for s, v in splits.items()}
    tokens = {s: v["tokens"] for s, v in splits.items()}
    row = (cfg.run_id, started, datetime.now(timezone.utc), silver_version, root, shard_dir, manifest_sha,
           manifest["tokenizer"]["sha256"], settings["max_length"], records, tokens, manifest["drops"],
           manifest["tokenized_table"]["version"], pruned)
    store.write(spark.createDataFrame([row], RUNS_DDL), t.tokenize_runs, mode="append", job="tokenize",
                run_id=cfg.run_id)
    return {
        "job": "tokenize", "run_id": cfg.run_id,
        "silver": store.location(t.silver), "silver_version": silver_version,
        "tokenized": manifest["tokenized_table"]["location"],
        "tokenized_version": manifest["tokenized_table"]["version"],
        "shards_root": root, "shard_dir": shard_dir, "manifest_sha256": manifest_sha, "pruned": pruned,
        "tokenizer": settings["tokenizer"],
        "tokenizer_sha256": manifest["tokenizer"]["sha256"], "max_length": settings["max_length"],
        "records_in": manifest["records"] + sum(manifest["drops"].values()),
        "records": records, "tokens": tokens,
        "shards": {s: len(v["shards"]) for s, v in splits.items()},
        "drops": manifest["drops"], "mds": mds, "tokenize_runs": store.location(t.tokenize_runs),
        "job_seconds": round(time.time() - t0, 2),
    }


def main(argv: list[str] | None = None) -> int:
    from dollyflow.cli import run_job
    return run_job("tokenize", argv)
