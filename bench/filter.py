#!/usr/bin/env python
"""The filter job's throughput against the same detectors called in a plain Python loop in one
process, in the same run, on the same records.

    .venv/bin/python bench/filter.py                    # 100,000 records (the issue's size), local[2]
    .venv/bin/python bench/filter.py --records 20000    # quicker

Records: a ``../shared/tools/make_corpus.py`` corpus grown from the real dolly-15k sample (no
planted duplicates or bad lines), with, deterministically, an email added to every 40th context,
a phone number to every 55th response and every 300th response replaced by a French one; the
benchmark file holds the instructions of the sample records with at least 13 words (26), so
every record is looked up against a real index (make_corpus rewrites the sample's texts, so in
the 100,000-record run none matched). The records are written as a silver table (not timed).

Sides, one after the other:

- **loop**: one process, one core: the per-category length statistics (numpy median / MAD of
  log word counts), one :class:`dollyflow.core.filtering.RecordFilter` (presidio, lingua, the
  rules, the benchmark index: their imports included) and ``decide`` over every record in a plain
  Python loop;
- **job**: ``dollyflow.jobs.filter.run`` on Spark ``local[--cores]`` with ``skip_unchanged=false``:
  silver read, the length statistics, the ``mapInPandas`` pass (Python workers started and the
  detectors built in each), the counts, both tables staged, checked and committed, the run row.
  The Spark session exists before (its JVM start is not counted).

Reported: records/s of each side and job / loop (the issue's goal: >= 1.5 on 2 cores), and how
many records the two sides decided the same way (stage and reason). One JSON object, also
written to ``<workdir>/result.json``. Figures: bench/README.md. Run it under the heavy-work lock:
``flock /tmp/dollyflow-heavy.lock .venv/bin/python bench/filter.py``.
"""
from __future__ import annotations

import os
import sys

# bench/ holds tokenize.py, which would shadow the standard library's tokenize module.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FRENCH = ("La réponse dépend du contexte, mais en général il faut lire attentivement la question et "
          "répondre avec précision, sans ajouter de détails inutiles.")


def corpus_records(records: int, seed: int, workdir: Path) -> list[dict]:
    corpus = workdir / "corpus.jsonl"
    if not corpus.exists():
        subprocess.run([sys.executable, str(SHARED / "tools" / "make_corpus.py"),
                        str(SHARED / "data" / "dolly-sample.jsonl"), "--records", str(records),
                        "--exact-rate", "0", "--near-rate", "0", "--bad-rate", "0", "--seed", str(seed),
                        "--out", str(corpus), "--truth", str(workdir / "truth.jsonl")], check=True)
    rows = [json.loads(line) for line in open(corpus, encoding="utf-8") if line.strip()]
    for i, r in enumerate(rows):
        if i % 40 == 0:
            r["context"] = (r.get("context") or "") + f" Contact me at user{i}@example.com for details."
        if i % 55 == 0:
            r["response"] = r["response"] + f" Call +1 415-555-{1000 + i % 9000:04d} after nine."
        if i % 300 == 0:
            r["response"] = FRENCH
    return rows


def benchmark_file(workdir: Path) -> Path:
    out = workdir / "benchmark.jsonl"
    with open(out, "w", encoding="utf-8") as fh:
        for line in open(SHARED / "data" / "dolly-sample.jsonl", encoding="utf-8"):
            r = json.loads(line)
            if len(r["instruction"].split()) >= 13:
                fh.write(json.dumps({"question": r["instruction"]}) + "\n")
    return out


def loop_stats(rows: list[dict], min_records: int) -> dict:
    import numpy as np

    from dollyflow.core.filtering import length_stats
    from dollyflow.core.filtering.quality import words_of
    per: dict = {}
    for r in rows:
        n = len(words_of(r["response"]))
        if n:
            per.setdefault(r["category"], []).append(math.log(n))
    out = {}
    for cat, xs in per.items():
        a = np.asarray(xs)
        med = float(np.median(a))
        out[cat] = (len(xs), med, float(np.median(np.abs(a - med))))
    return length_stats(out, min_records)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dollyflow-bench-filter"))
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.workdir / "warehouse", ignore_errors=True)

    from dollyflow.config import load_config
    from dollyflow.engine.delta import DeltaStore
    from dollyflow.engine.session import get_session
    from dollyflow.testing.evaluation import SILVER_DDL, silver_rows

    rows = corpus_records(args.records, args.seed, args.workdir)
    bench = benchmark_file(args.workdir)
    cfg = load_config("filter", [f"tables.warehouse={args.workdir / 'warehouse'}", f"spark.master=local[{args.cores}]",
                                 f"spark.shuffle_partitions={2 * args.cores}", f"filter.decontaminate=[{bench}]",
                                 "filter.skip_unchanged=false"])
    spark = get_session(cfg.spark)
    store = DeltaStore(spark, cfg.tables)
    silver = silver_rows(rows)
    store.write(spark.createDataFrame(silver, SILVER_DDL).repartition(4 * args.cores), cfg.tables.silver,
                mode="overwrite")
    n = store.count(cfg.tables.silver)

    # loop: one process, the same detectors, cold
    t0 = time.perf_counter()
    from dollyflow.core.filtering import FilterSettings, RecordFilter, build_index
    index = build_index([str(bench)], list(cfg.filter.decontaminate_fields), cfg.filter.ngram)
    stats = loop_stats(rows, cfg.filter.length_min_records)
    rf = RecordFilter(FilterSettings.from_config(cfg.filter, index.files), index, stats)
    t_build = time.perf_counter() - t0
    loop = {}
    for rid, ins, ctx, res, cat, *_ in silver:
        d = rf.decide(ins, ctx, res, cat)
        loop[rid] = (d.stage, d.reason)
    loop_s = time.perf_counter() - t0

    # job: the whole filter job on local[cores]
    from dollyflow.jobs import filter as filter_job
    t0 = time.perf_counter()
    summary = filter_job.run(cfg, spark)
    job_s = time.perf_counter() - t0
    job = {r["record_id"]: (r["stage"], r["reason"]) for r in store.read(cfg.tables.filtered).collect()}
    same = sum(1 for rid, v in loop.items() if job.get(rid, (None, None)) == v)
    loop_reasons = Counter(f"{s}/{r}" for s, r in loop.values() if s)
    result = {
        "records": n, "cores": args.cores, "master": cfg.spark.master,
        "loop": {"seconds": round(loop_s, 2), "build_seconds": round(t_build, 2),
                 "records_per_s": round(n / loop_s, 1), "removed": dict(sorted(loop_reasons.items()))},
        "job": {"seconds": round(job_s, 2), "records_per_s": round(n / job_s, 1),
                "step_seconds": summary.get("step_seconds"), "removed": summary["removed"],
                "redactions": summary["redactions"], "rows_kept": summary["rows_kept"]},
        "job_over_loop": round(loop_s / job_s, 3),
        "same_decision": same, "same_decision_share": round(same / max(1, len(loop)), 5),
    }
    text = json.dumps(result, indent=1)
    (args.workdir / "result.json").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
