#!/usr/bin/env python
"""Tokenize throughput: the Spark job against the fast tokenizer's own batch encoding, measured in
the same run on the same texts.

    .venv/bin/python bench/tokenize.py --records 20000 --workdir /tmp/tokenize-bench

Steps:

1. a make_corpus corpus (no planted duplicates or bad lines) written as a silver-shaped Delta
   table, one row per record_id (not timed: ingest and dedupe have their own benchmarks);
2. **baseline**: ``tokenizers.Tokenizer.encode_batch`` (the Rust backend of the Hugging Face fast
   tokenizer, with Dolly's special tokens) over the same Dolly training prompts in this one
   process, single-threaded (``TOKENIZERS_PARALLELISM=false``), ids taken out as Python lists;
   tokens/s times the number of cores = the ideal for the machine;
3. **stage**: the job's tokenization (:func:`dollyflow.engine.tokenize.tokenize_records` over
   the silver table, input repartitioned as the job does, forced by an aggregate): tokens/s;
4. **job**: ``dollyflow.jobs.tokenize.run`` end to end (silver read, tokenization, split, the
   ``tokenized`` Delta table, shard plan, shard files, manifest, tokenizer save): tokens/s, with
   ``tokenize.skip_unchanged=false`` so every repeat does the work. The Spark jobs, stages and
   tasks the job ran are counted (``job_spark``) through a job group.

Each repeat runs baseline, stage and job in turn (so they share the machine's load); the best of
each is reported with ratio = tokens/s / (baseline tokens/s per core x cores). The token count
is the same on all sides (checked). Prints one JSON object, also written to <workdir>/result.json.
"""
from __future__ import annotations

import os
import sys

# This script shares its name with the stdlib module ``tokenize`` (imported by linecache, inspect, ...):
# take its directory off the import path before anything imports it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DOLLYFLOW_SHARED", REPO.parent / "shared")).resolve()
SILVER_DDL = ("record_id string, instruction string, context string, response string, category string, "
              "source_file string, source_line long, ingested_at timestamp, run_id string")


def make_corpus(records: int, workdir: Path, seed_file: Path) -> Path:
    out = workdir / "corpus.jsonl"
    subprocess.run([sys.executable, str(SHARED / "tools" / "make_corpus.py"), str(seed_file),
                    "--records", str(records), "--exact-rate", "0", "--near-rate", "0", "--bad-rate", "0",
                    "--out", str(out), "--truth", str(workdir / "truth.jsonl")], check=True,
                   capture_output=True)
    return out


def silver_rows(corpus: Path) -> list[tuple]:
    from dollyflow.core.records import record_id

    now = datetime.now(timezone.utc)
    rows, seen = [], set()
    for n, line in enumerate(open(corpus, encoding="utf-8"), 1):
        r = json.loads(line)
        ctx = r.get("context") or ""
        rid = record_id(r["instruction"], ctx, r["response"], r["category"])
        if rid in seen:
            continue
        seen.add(rid)
        rows.append((rid, r["instruction"], ctx, r["response"], r["category"], str(corpus), n, now, "bench"))
    return rows


def tree_cpu_seconds(root: int | None = None) -> float:
    """CPU seconds (user + system, including reaped children) of a process and all its live
    descendants -- here this driver, its JVM and the JVM's Python workers. Linux /proc only."""
    root = root or os.getpid()
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is state (field 3); ppid is field 4, utime..cstime are fields 14-17
        stats[int(d)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0))[1]
        todo += children.get(pid, [])
    return total / tick


def timed(fn):
    """(result, wall seconds, CPU seconds of this process tree)."""
    c0, t0 = tree_cpu_seconds(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, tree_cpu_seconds() - c0


def baseline(backend, texts: list[str]) -> tuple[int, float]:
    """(tokens, seconds) of one single-threaded batch encoding of ``texts``."""
    t0 = time.perf_counter()
    enc = backend.encode_batch(texts, add_special_tokens=True)
    tokens = sum(len(e.ids) for e in enc)
    return tokens, time.perf_counter() - t0


def stage(spark, store, cfg, tokenizer_json: str) -> tuple[int, float]:
    from pyspark.sql import functions as F

    from dollyflow.engine.tokenize import tokenize_records, with_parallelism
    t0 = time.perf_counter()
    df = with_parallelism(store.read(cfg.tables.silver))
    out = tokenize_records(df, tokenizer_json, cfg.tokenize.max_length, cfg.tokenize.seed)
    tokens = out.agg(F.sum("length")).first()[0]
    return int(tokens), time.perf_counter() - t0


def spark_work(spark, fn):
    """(fn's result, {"jobs", "stages", "tasks"} Spark ran for it), counted through a job group."""
    import uuid

    sc = spark.sparkContext
    group = f"bench-{uuid.uuid4().hex[:8]}"
    sc.setJobGroup(group, "tokenize bench")
    try:
        out = fn()
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
    tracker = sc.statusTracker()
    jobs = tracker.getJobIdsForGroup(group)
    stages = {sid for j in jobs for sid in (tracker.getJobInfo(j).stageIds if tracker.getJobInfo(j) else [])}
    infos = [tracker.getStageInfo(sid) for sid in stages]
    ran = [i for i in infos if i is not None and i.numCompletedTasks > 0]
    return out, {"jobs": len(jobs), "stages_run": len(ran), "tasks": sum(i.numCompletedTasks for i in ran)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=20000)
    p.add_argument("--workdir", default="/tmp/tokenize-bench")
    p.add_argument("--tokenizer", default=str(SHARED / "assets" / "gpt-neox-20b"))
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cores", type=int, default=os.cpu_count())
    args = p.parse_args(argv)

    from dollyflow.config import load_config
    from dollyflow.core.prompt import format_training_prompt
    from dollyflow.core.tokens import backend_from_json, load_tokenizer
    from dollyflow.engine.delta import DeltaStore
    from dollyflow.engine.session import get_session
    from dollyflow.jobs import tokenize

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    corpus = make_corpus(args.records, work, SHARED / "data" / "dolly-sample.jsonl")
    rows = silver_rows(corpus)
    if len(rows) < 15000:
        print(f"warning: only {len(rows)} distinct records (< 15,000)", file=sys.stderr)

    from dollyflow.config import TokenizeConfig
    overrides = ["tokenize.source_table=silver", f"tables.warehouse={work / 'warehouse'}", f"tokenize.tokenizer={args.tokenizer}",
                 f"tokenize.max_length={args.max_length}", "tokenize.test_size=1000",
                 f"spark.master=local[{args.cores}]", f"spark.shuffle_partitions={2 * args.cores}"]
    if hasattr(TokenizeConfig, "skip_unchanged"):
        overrides.append("tokenize.skip_unchanged=false")   # every repeat does the whole job
    cfg = load_config("tokenize", overrides)
    spark = get_session(cfg.spark)
    store = DeltaStore(spark, cfg.tables)
    store.write(spark.createDataFrame(rows, SILVER_DDL), cfg.tables.silver, mode="overwrite", job="bench",
                run_id="bench")

    tok = load_tokenizer(args.tokenizer)
    tokenizer_json = tok.backend_tokenizer.to_str()
    backend = backend_from_json(tokenizer_json)
    texts = [format_training_prompt(r[1], r[3], r[2]) for r in rows]
    baseline(backend, texts[:500])  # warm-up

    runs = []
    summary = None
    for i in range(args.repeats):
        (b_tokens, _), b_s, b_cpu = timed(lambda: baseline(backend, texts))
        (s_tokens, _), s_s, s_cpu = timed(lambda: stage(spark, store, cfg, tokenizer_json))
        (summary, work_done), j_s, j_cpu = timed(lambda: spark_work(spark, lambda: tokenize.run(cfg, spark)))
        if s_tokens != b_tokens:
            raise SystemExit(f"token counts differ: stage {s_tokens} vs baseline {b_tokens}")
        runs.append({"baseline_s": round(b_s, 3), "baseline_cpu_s": round(b_cpu, 2),
                     "stage_s": round(s_s, 3), "stage_cpu_s": round(s_cpu, 2),
                     "job_s": round(j_s, 3), "job_cpu_s": round(j_cpu, 2), "job_spark": work_done,
                     "job_steps": summary.get("step_seconds"),
                     "load_avg_1m": os.getloadavg()[0]})
        print(json.dumps({"repeat": i, **runs[-1]}), file=sys.stderr, flush=True)

    tokens = b_tokens
    best = {k: min(r[k] for r in runs) for k in runs[0] if k not in ("job_spark", "job_steps")}
    base_tps = tokens / best["baseline_s"]
    ideal = base_tps * args.cores
    stage_tps = tokens / best["stage_s"]
    job_tps = tokens / best["job_s"]
    result = {
        "records": len(rows), "tokens": tokens, "cores": args.cores, "max_length": args.max_length,
        "tokenizer": args.tokenizer, "repeats": runs,
        "baseline_tokens_per_s_one_thread": round(base_tps), "baseline_x_cores_tokens_per_s": round(ideal),
        "stage_tokens_per_s": round(stage_tps), "stage_ratio": round(stage_tps / ideal, 3),
        "job_tokens_per_s": round(job_tps), "job_ratio": round(job_tps / ideal, 3),
        # Work efficiency, immune to other processes sharing the cores: baseline CPU s / our CPU s
        # (driver + JVM + Python workers) for the same tokens.
        "stage_cpu_efficiency": round(best["baseline_cpu_s"] / best["stage_cpu_s"], 3),
        "job_cpu_efficiency": round(best["baseline_cpu_s"] / best["job_cpu_s"], 3),
        "job_spark": runs[-1]["job_spark"],
        "job_summary": {k: summary[k] for k in ("records", "tokens", "shards", "drops", "shard_dir")},
    }
    print(json.dumps(result, indent=2))
    (work / "result.json").write_text(json.dumps(result, indent=2))
    spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
