"""tokenize: curated (the filter job's output; `tokenize.source_table=silver` reads silver) -> the ``tokenized`` Delta table and training shards with a manifest.

Each silver record becomes Dolly's training prompt, encoded with the model's tokenizer plus
Dolly's special tokens (pad = eos); the loss counts only the response and ``### End``
(``response_start`` is the first such token). With ``prompt.format=chat_template`` the
tokenizer's own chat template renders it instead, with no added token
(:mod:`dollyflow.core.prompt_format`); the format goes into the manifest (``prompt``). Prompts longer than ``max_length`` are dropped,
never truncated, and counted by reason. Records are split train/test by hash of record_id and
seed. Output:

- the ``tokenized`` table (overwritten): record_id, split, category, input_ids, response_start, length;
- a new shard directory ``<shards root>/v<silver version>-<run id>/``: per split, Parquet shards
  balanced by tokens, ``manifest.json`` and the ``tokenizer/`` used. The trainer needs only this
  directory (:class:`dollyflow.core.shards.ShardDataset`), or the root, whose ``LATEST.json``
  names the newest complete one (:func:`dollyflow.core.shards.resolve_shard_dir`);
- one row in ``tokenize_runs`` (silver version, shard directory, manifest sha256, counts).

One pass: silver is tokenized once; each task writes its kept rows (token ids as int32 bytes,
sorted by split key) to one Arrow staging file under the new shard directory and sends only the
narrow columns (record id, split key, length, drop reason, file and row: about 50 bytes a
record) to the driver, which counts the drops and works out the split and the token-balanced
shard plan; a shard is then a row range of each staging file, and each writer task reads just
those ranges and writes, for its shards, both the shard file and the table's Parquet file from
the same rows; the table files are then committed to ``tokenized`` at once. Two Spark jobs in
all, and the token ids never go through the JVM.

Counts are measured, compared stage to stage, and a mismatch fails the run naming both numbers:
silver's rows at the version read (from its Delta log) = tokenized + dropped; records per split
of the split = records in the shards the tasks wrote = rows of the ``tokenized`` commit; records
per shard of the plan = records in that shard's file; and the
shards are re-read and checked against the manifest before the pointer moves.

The shards root (:func:`dollyflow.config.shards_root`) is ``<warehouse>/shards/<silver>`` locally
and on clusters (where the warehouse must be a shared URI), ``/Volumes/<catalog>/<schema>/<volume>
/shards/<silver>`` on Databricks. Executors write the shards themselves, so a plain local path is
refused when they may run on other hosts. Nothing of an earlier version is touched before the
new one is complete and verified; older versions beyond ``tokenize.keep_versions`` are pruned
only after that.

The pointer never moves back (:func:`dollyflow.core.shards.write_pointer`): when a run over a
newer silver version (or over the same version, started later) has moved it already, this run's
shards stay complete where they are, the pointer stays, and the summary says so
(``shards_current: false``, ``not_current``, ``current_shard_dir``); pruning never removes the
directory the pointer names.

Idempotent: with ``tokenize.skip_unchanged`` (default) a run whose pointer already names shards
built from the same silver version with the same settings (tokenizer sha256, max_length,
test_size, seed, num_shards, format version), while ``tokenized`` is still at the version that
run wrote, writes nothing and reports ``skipped: true``.
"""
from __future__ import annotations

import tempfile
import time
from datetime import datetime, timezone

from dollyflow.config import Config, shards_root
from dollyflow.core.shards import (POINTER, export_mds, manifest_sha256, mds_available, prune_versions,
                                   shard_settings, unchanged_shards, version_dir_name, write_pointer)
from dollyflow.core.storage import absolute, check_reachable, join, remove_dir
from dollyflow.core.prompt_format import DOLLY, prompt_tokenizer, provenance as format_provenance
from dollyflow.core.tokens import save_tokenizer
from dollyflow.engine.delta import DeltaStore
from dollyflow.engine.session import master_of
from dollyflow.engine.tokenize import build_version

RUNS_DDL = ("run_id string, started_at timestamp, finished_at timestamp, silver_version long, "
            "shards_root string, shard_dir string, manifest_sha256 string, tokenizer_sha256 string, "
            "max_length int, records map<string,long>, tokens map<string,long>, drops map<string,long>, "
            "tokenized_version long, pruned array<string>, silver_rows long, source_table string")


def source_of(cfg: Config) -> str:
    """The table tokenize reads (``tokenize.source_table``: curated, the filter job's output, or
    silver); the run row's and manifest's ``silver*`` fields describe it."""
    return getattr(cfg.tables, cfg.tokenize.source_table)


def resolve_settings(cfg: Config) -> dict:
    """Tokenizer name and max_length, defaulting to the model's."""
    tk = cfg.tokenize
    max_length = tk.max_length if tk.max_length is not None else cfg.model.max_length
    if max_length is None or int(max_length) < 1:
        raise ValueError(f"tokenize.max_length must be a positive int, got {max_length!r}")
    return {"tokenizer": tk.tokenizer or cfg.model.tokenizer_name, "max_length": int(max_length)}


def run(cfg: Config, spark) -> dict:
    t0 = time.time()
    started = datetime.now(timezone.utc)
    t, tk = cfg.tables, cfg.tokenize
    if tk.mds and not mds_available():
        raise RuntimeError("tokenize.mds=true needs the mosaicml-streaming package (pip install "
                           "mosaicml-streaming), which cannot be imported here")
    settings = resolve_settings(cfg)
    root = absolute(shards_root(cfg))
    check_reachable(root, master_of(spark), tk.allow_local_output, "tokenize.output_dir (shards root)",
                    cfg.tables.shared_mounts, "tokenize.allow_local_output")
    store = DeltaStore(spark, cfg.tables)
    src = source_of(cfg)
    silver_version = tk.silver_version if tk.silver_version is not None else store.version(src)
    if silver_version is None:
        raise RuntimeError(f"{tk.source_table} table {store.location(src)} does not exist: run "
                           f"{'filter' if tk.source_table == 'curated' else 'dedupe'} first")
    silver_version = int(silver_version)
    base = {"job": "tokenize", "run_id": cfg.run_id, "silver": store.location(src), "source_table": src,
            "silver_version": silver_version, "shards_root": root, "tokenizer": settings["tokenizer"],
            "max_length": settings["max_length"], "prompt_format": cfg.prompt.format, "backend": store.backend, "backend_reason": store.backend_reason,
            "tokenize_runs": store.location(t.tokenize_runs)}
    timings: dict = {}
    with tempfile.TemporaryDirectory(prefix="dollyflow-tokenizer-") as tok_dir:
        # The tokenizer, saved once on the driver: its sha256 decides skip_unchanged, its files go
        # next to the shards, its tokenizer.json to the workers.
        t1 = time.time()
        tokenizer, fmt = prompt_tokenizer(settings["tokenizer"], cfg.prompt.format, cfg.prompt.system)
        settings["prompt"] = fmt.to_dict() if fmt.name != DOLLY else None
        settings["prompt_info"] = format_provenance(fmt)
        tok_info = save_tokenizer(tokenizer, tok_dir)
        timings["start"] = round(t1 - t0, 3)
        timings["tokenizer"] = round(time.time() - t1, 3)
        build = shard_settings(tokenizer_sha256=tok_info["sha256"], max_length=settings["max_length"],
                               test_size=tk.test_size, seed=tk.seed, num_shards=tk.num_shards,
                               prompt_format=fmt.name)
        if fmt.name != DOLLY:
            build["prompt_system"] = cfg.prompt.system
        prev = None
        if tk.skip_unchanged:
            prev = unchanged_shards(root, store.location(src), silver_version, build)
            # ... and only while the tokenized table is still at the version that run wrote
            if prev is not None and (prev["tokenized_table"]["location"] != store.location(t.tokenized) or
                                     store.version(t.tokenized) != prev["tokenized_table"]["version"]):
                prev = None
        if prev is not None:
            return {**base, "skipped": True, "previous_run_id": prev["run_id"], "shard_dir": prev["_dir"],
                    "manifest_sha256": manifest_sha256(prev["_dir"]),
                    "tokenized": prev["tokenized_table"]["location"],
                    "tokenized_version": prev["tokenized_table"]["version"],
                    "tokenizer_sha256": build["tokenizer_sha256"],
                    "records": {s: v["records"] for s, v in prev["splits"].items()},
                    "tokens": {s: v["tokens"] for s, v in prev["splits"].items()}, "drops": prev["drops"],
                    "silver_rows": prev["source"].get("rows"), "records_in": prev["source"].get("rows"),
                    "records_tokenized": prev["records"], "records_dropped": sum(prev["drops"].values()),
                    "job_seconds": round(time.time() - t0, 2)}
        # A new directory per run; the root's pointer moves to it only once it is complete and
        # verified, and nothing of an earlier version is touched before that.
        name = version_dir_name(silver_version, cfg.run_id)
        shard_dir = join(root, name)
        try:
            manifest = build_version(cfg, spark, store, silver_version, shard_dir, settings, tok_dir, tok_info,
                                     build, timings)
        except BaseException:
            remove_dir(shard_dir, under=root)
            raise
    t1 = time.time()
    manifest_sha = manifest_sha256(shard_dir)
    pointer = write_pointer(root, name, run_id=cfg.run_id, silver=store.location(src),
                            silver_version=silver_version, started_at=started.isoformat(timespec="microseconds"),
                            manifest_sha256=manifest_sha)
    current = {"shards_current": bool(pointer["moved"]), "current_shard_dir": join(root, pointer["dir"]),
               "current_silver_version": pointer.get("silver_version")}
    if not pointer["moved"]:    # a run over a newer silver version (or started later) finished first
        current["not_current"] = (
            f"these shards are not the current ones: {join(root, POINTER)} names {pointer['dir']} (silver "
            f"v{pointer.get('silver_version')}, run {pointer.get('run_id')}), newer than this run's silver "
            f"v{silver_version}; the pointer stays there, this run's shards stay at {shard_dir}")
    pruned = prune_versions(root, keep=tk.keep_versions, protect=(name, pointer["dir"]))
    mds = export_mds(shard_dir) if tk.mds else None
    splits = manifest["splits"]
    records = {s: v["records"] for s, v in splits.items()}
    tokens = {s: v["tokens"] for s, v in splits.items()}
    silver_rows = manifest["source"]["rows"]
    row = (cfg.run_id, started, datetime.now(timezone.utc), silver_version, root, shard_dir, manifest_sha,
           manifest["tokenizer"]["sha256"], settings["max_length"], records, tokens, manifest["drops"],
           manifest["tokenized_table"]["version"], pruned, silver_rows, src)
    store.append_rows([row], RUNS_DDL, t.tokenize_runs, job="tokenize", run_id=cfg.run_id, evolve_schema=True)
    timings["finish"] = round(time.time() - t1, 3)
    return {
        **base, "skipped": False,
        "tokenized": manifest["tokenized_table"]["location"],
        "tokenized_version": manifest["tokenized_table"]["version"],
        "shard_dir": shard_dir, "manifest_sha256": manifest_sha, "pruned": pruned,
        "tokenizer_sha256": manifest["tokenizer"]["sha256"],
        "silver_rows": silver_rows, "records_in": silver_rows, "records_tokenized": manifest["records"],
        "records_dropped": sum(manifest["drops"].values()),
        "records": records, "tokens": tokens,
        "shards": {s: len(v["shards"]) for s, v in splits.items()},
        "drops": manifest["drops"], "mds": mds, "step_seconds": timings, **current,
        "job_seconds": round(time.time() - t0, 2),
    }
