#!/usr/bin/env python
"""Per-record scoring throughput: the evaluate job's metrics against ``rouge-score`` called in a
plain Python loop, in the same run, on the same rows.

    .venv/bin/python bench/evaluate.py                  # 100,000 rows (the issue's size)
    .venv/bin/python bench/evaluate.py --rows 20000     # quicker

Rows (deterministic, ``--seed``): references built from the responses of the real dolly-15k
sample (``../shared/data/dolly-sample.jsonl``; generated records without it): each takes a sample
response and swaps some of its sentences for sentences of other responses, so that references
are many and different while keeping Dolly's vocabulary and its length spread (1 to over 1,000
words). Predictions: 10% the reference itself, 15% another reference (a wrong answer), the rest
an edit of the reference as a model answer differs from it (words dropped, replaced by sample
words, repeated; sentences reordered; answers cut short; a "Sure! " opening), at most 200 words
(what ``max_new_tokens`` 256 lets a model write). About 1% of the predictions are empty (a failed
generation, or every word dropped: counted with ``reason``, as the job does).

Sides, one after the other in one process:

- **baseline**: ``rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"]).score(reference,
  prediction)`` in a plain Python loop over every row: ROUGE only, rouge-score's defaults (no
  stemmer, its fastest form).
- **core**: ``dollyflow.core.evaluation.metrics.score_many`` over every row in one call, one
  process, one core: every metric of the job (ROUGE-1/2/L with the Porter stemmer, BLEU, chrF,
  SQuAD token F1 and exact match, length ratio), cold (its libraries' imports included).
- **job**: the job's scoring path on Spark ``local[1]`` (one task slot: one core):
  ``dollyflow.engine.evaluate.score_rows`` (a repartition, then ``score_frames`` in
  ``mapInPandas``) over the rows read from parquet, persisted and counted as the job does
  (its ``score_seconds``), the Python worker's start and imports included. Besides wall-clock
  records/s, the CPU seconds of the whole process tree (driver, JVM, Python workers) during the
  action: records per CPU-second, the job's cost per core with Spark's own threads counted.
- **stemmed baseline** (informative): ``RougeScorer(..., use_stemmer=True)`` on the first tenth
  of the rows (``--stemmed-rows``): the rouge-score configuration whose values the core's ROUGE
  equals; its ROUGE values are compared with the core's, and the job's metrics with the core's on
  every row.

Reported: records/s of each side and its ratio to the baseline (the issue's goal: core and job
>= 1.0 per core). Prints one JSON object, also written to ``<workdir>/result.json``. Figures:
bench/README.md. Run it under the heavy-work lock:
``flock /tmp/dollyflow-heavy.lock .venv/bin/python bench/evaluate.py``.
"""
from __future__ import annotations

import os
import sys

# bench/ holds tokenize.py, which would shadow the standard library's tokenize module: take this
# directory off the import path before anything imports it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))
SHARED = Path(os.environ.get("DOLLYFLOW_SHARED", REPO.parent / "shared")).resolve()

#: The most words a prediction has (Dolly generates max_new_tokens=256: ~190 words).
MAX_PREDICTION_WORDS = 200
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sample_records() -> tuple[list[dict], str]:
    sample = SHARED / "data" / "dolly-sample.jsonl"
    if sample.is_file():
        return [json.loads(line) for line in open(sample, encoding="utf-8")], str(sample)
    from dollyflow.testing.samples import generate_records
    return generate_records(300), "generated (dollyflow.testing.samples)"


def build_rows(n: int, seed: int) -> tuple[list[str], list[str], list[str]]:
    """``n`` (prediction, reference, category) rows, deterministic in ``seed`` (module docstring)."""
    records, _ = sample_records()
    rng = random.Random(seed)
    docs = [(r["category"], _SENTENCE_END.split(r["response"].strip())) for r in records if r["response"].strip()]
    sentences = [s for _, ss in docs for s in ss]
    words = [w for s in sentences for w in s.split()]

    def reference() -> tuple[str, str]:
        category, ss = rng.choice(docs)
        return category, " ".join(s if rng.random() < 0.6 else rng.choice(sentences) for s in ss)

    def answer(ref: str) -> str:
        ss = _SENTENCE_END.split(ref)
        if len(ss) > 1 and rng.random() < 0.2:
            rng.shuffle(ss)
        out = []
        for w in " ".join(ss).split():
            r = rng.random()
            if r < 0.10:
                continue
            out.append(rng.choice(words) if r < 0.20 else w)
            if r > 0.97:
                out.append(w)
        if rng.random() < 0.4:
            out = out[:max(1, int(len(out) * rng.uniform(0.3, 1.0)))]
        if rng.random() < 0.1:
            out.insert(0, "Sure!")
        return " ".join(out[:MAX_PREDICTION_WORDS])

    preds, refs, cats = [], [], []
    for _ in range(n):
        category, ref = reference()
        kind = rng.random()
        if kind < 0.01:
            pred = ""
        elif kind < 0.11:
            pred = " ".join(ref.split()[:MAX_PREDICTION_WORDS])
        elif kind < 0.26:
            pred = " ".join(reference()[1].split()[:MAX_PREDICTION_WORDS])
        else:
            pred = answer(ref)
        preds.append(pred)
        refs.append(ref)
        cats.append(category)
    return preds, refs, cats


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def tree_cpu_seconds() -> float:
    """User+system CPU seconds of this process and every live descendant (a reaped child's time
    is in its parent's cutime/cstime, so each second is counted once)."""
    parent, stats = {}, {}
    tick = os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(pid)] = int(fields[1])
        stats[int(pid)] = sum(int(v) for v in fields[11:15]) / tick   # utime stime cutime cstime
    me, total = os.getpid(), 0.0
    for pid, seconds in stats.items():
        p = pid
        while p not in (0, 1, me) and p in parent:
            p = parent[p]
        if p == me:
            total += seconds
    return total


def baseline(preds: list[str], refs: list[str], stemmer: bool) -> list:
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=stemmer)
    return [scorer.score(ref, pred) for pred, ref in zip(preds, refs)]


def job(preds: list[str], refs: list[str], cats: list[str], workdir: Path, partitions: int) -> dict:
    """The job's scoring path on local[1] (module docstring): seconds, CPU seconds, its rows."""
    import pandas as pd

    from dollyflow.config.schema import SparkConfig
    from dollyflow.engine.evaluate import PASS_THROUGH, score_rows
    from dollyflow.engine.session import get_session

    spark = get_session(SparkConfig(master="local[1]", shuffle_partitions=partitions, driver_memory="4g"))
    n = len(preds)
    pdf = pd.DataFrame({"record_id": [f"r{i:07d}" for i in range(n)], "category": cats, "model": "bench",
                        "model_sha": "0" * 64, "params_sha": "bench", "silver_version": 1,
                        "finish_reason": "stop", "prediction_sha": "", "prediction": preds, "reference": refs})
    assert list(pdf.columns[:len(PASS_THROUGH)]) == PASS_THROUGH
    src = workdir / "rows.parquet"
    spark.createDataFrame(pdf).write.mode("overwrite").parquet(str(src))
    rows = spark.read.parquet(str(src))
    rows.count()
    cpu0, t0 = tree_cpu_seconds(), time.perf_counter()
    scored = score_rows(rows, partitions).persist()
    count = scored.count()
    seconds, cpu = time.perf_counter() - t0, tree_cpu_seconds() - cpu0
    out = scored.toPandas().sort_values("record_id").reset_index(drop=True)
    scored.unpersist()
    spark.stop()
    assert count == n, (count, n)
    return {"seconds": seconds, "cpu_seconds": cpu, "rows": out, "master": "local[1]", "partitions": partitions}


def same(a, b) -> bool:
    if a is None or (isinstance(a, float) and math.isnan(a)):
        return b is None or (isinstance(b, float) and math.isnan(b))
    return a == b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=22)
    ap.add_argument("--stemmed-rows", type=int, default=None,
                    help="rows of the stemmed-baseline side and its value check (default: a tenth of --rows)")
    ap.add_argument("--partitions", type=int, default=8, help="the job's tasks (spark.default.parallelism)")
    ap.add_argument("--no-job", action="store_true", help="skip the Spark side")
    ap.add_argument("--workdir", default="/tmp/dollyflow-bench-evaluate")
    args = ap.parse_args()
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)

    from dollyflow.core.evaluation.metrics import METRICS, ROUGE_TYPES, score_many

    (preds, refs, cats), build_s, _ = timed(lambda: build_rows(args.rows, args.seed))
    n = len(preds)
    _, source = sample_records()
    ref_words = sorted(len(r.split()) for r in refs)
    pred_words = [len(p.split()) for p in preds]
    print(f"{n} rows from {source} in {build_s:.1f} s: {len(set(refs))} distinct references, "
          f"reference words median {ref_words[n // 2]} / mean {sum(ref_words) / n:.0f} / max {ref_words[-1]}, "
          f"prediction words mean {sum(pred_words) / n:.0f}", file=sys.stderr, flush=True)

    def rate(seconds: float, rows: int = n) -> float:
        return rows / seconds

    _, base_s, base_cpu = timed(lambda: baseline(preds, refs, stemmer=False))
    print(f"baseline: {rate(base_s):.0f} records/s ({base_s:.1f} s)", file=sys.stderr, flush=True)
    cols, core_s, core_cpu = timed(lambda: score_many(preds, refs))
    print(f"core: {rate(core_s):.0f} records/s ({core_s:.1f} s) = {base_s / core_s:.2f}x", file=sys.stderr,
          flush=True)

    k = args.stemmed_rows if args.stemmed_rows is not None else max(1, n // 10)
    k = min(k, n)
    stemmed, stem_s, _ = timed(lambda: baseline(preds[:k], refs[:k], stemmer=True))
    rouge_equal = sum(all(stemmed[i][t].fmeasure == cols[t][i] for t in ROUGE_TYPES)
                      for i in range(k) if cols["reason"][i] is None)
    scored_k = sum(r is None for r in cols["reason"][:k])
    print(f"stemmed baseline: {rate(stem_s, k):.0f} records/s on {k} rows; ROUGE equal to the core's on "
          f"{rouge_equal}/{scored_k} scored rows", file=sys.stderr, flush=True)

    result = {
        "rows": n, "source": source, "seed": args.seed, "distinct_references": len(set(refs)),
        "reference_words": {"median": ref_words[n // 2], "mean": round(sum(ref_words) / n, 1), "max": ref_words[-1]},
        "prediction_words_mean": round(sum(pred_words) / n, 1),
        "unscored_rows": {r: cols["reason"].count(r) for r in set(cols["reason"]) if r is not None},
        "baseline": {"what": "RougeScorer(['rouge1','rouge2','rougeL']).score in a loop, one core",
                     "records_per_s": round(rate(base_s)), "seconds": round(base_s, 1),
                     "cpu_seconds": round(base_cpu, 1)},
        "core": {"what": "metrics.score_many (all 8 metrics), one core", "records_per_s": round(rate(core_s)),
                 "seconds": round(core_s, 1), "cpu_seconds": round(core_cpu, 1),
                 "ratio": round(base_s / core_s, 3)},
        "stemmed_baseline": {"what": "RougeScorer(..., use_stemmer=True).score in a loop, one core", "rows": k,
                             "records_per_s": round(rate(stem_s, k)),
                             "core_ratio": round(rate(core_s) / rate(stem_s, k), 3),
                             "rouge_equal_to_core": f"{rouge_equal}/{scored_k}"},
    }
    if not args.no_job:
        j = job(preds, refs, cats, workdir, args.partitions)
        rows = j["rows"]
        order = [int(r[1:]) for r in rows["record_id"]]
        equal = sum(all(same(rows[m].iat[i], cols[m][order[i]]) for m in METRICS)
                    and same(rows["reason"].iat[i], cols["reason"][order[i]]) for i in range(len(rows)))
        result["job"] = {"what": f"engine.evaluate.score_rows on {j['master']}, {j['partitions']} tasks, "
                                 "persisted and counted (the job's score step)",
                         "records_per_s": round(rate(j["seconds"])), "seconds": round(j["seconds"], 1),
                         "ratio": round(base_s / j["seconds"], 3),
                         "cpu_seconds_process_tree": round(j["cpu_seconds"], 1),
                         "records_per_cpu_second": round(n / j["cpu_seconds"]),
                         "ratio_per_cpu_second": round((n / j["cpu_seconds"]) / rate(base_s), 3),
                         "rows_equal_to_core": f"{equal}/{n}"}
        print(f"job: {rate(j['seconds']):.0f} records/s ({j['seconds']:.1f} s) = {base_s / j['seconds']:.2f}x; "
              f"{n / j['cpu_seconds']:.0f} records per CPU-second of the process tree; rows equal to the core's "
              f"{equal}/{n}", file=sys.stderr, flush=True)
    text = json.dumps(result, indent=2)
    (workdir / "result.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
