"""Ingest throughput and driver memory, against plain Spark in the same run.

    .venv/bin/python bench/ingest.py --records 1000000

Builds (or reuses) a make_corpus file of ``--records`` lines, then in fresh processes:

- baseline: ``spark.read.json(corpus).write.parquet(out)`` (no validation, no line numbers,
  no dedupe by record id, no Delta commit);
- ours: the ingest job (validation, quarantine, accounting, Delta bronze commit);

and prints records/s for both and their ratio (goal >= 0.5). Driver memory: the peak RSS of
the driver's Python process and of its JVM, for ours at ``--records`` and at a tenth of it
(goal: flat in input size).
"""
from __future__ import annotations

import sys
from pathlib import Path

# bench/tokenize.py would shadow the standard library's tokenize module: drop bench/ from the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import os
import resource
import shutil
import subprocess
import time

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def corpus(records: int, work: Path) -> Path:
    out = work / f"corpus-{records}.jsonl"
    if not out.exists():
        tool = SHARED / "tools" / "make_corpus.py"
        if not tool.exists():
            sys.exit(f"needs {tool} (../shared beside the checkout)")
        subprocess.run([sys.executable, str(tool), str(SHARED / "data" / "dolly-sample.jsonl"),
                        "--records", str(records), "--out", str(out), "--truth", str(work / f"truth-{records}.jsonl"),
                        "--oversized"], check=True, stdout=subprocess.DEVNULL)
    return out


def jvm_peak_kib() -> int:
    """VmHWM of the driver JVM (the java child of this process)."""
    peak = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if int(open(f"/proc/{pid}/stat").read().split()[3]) != os.getpid():
                continue
            cmd = open(f"/proc/{pid}/cmdline").read()
            if "java" not in cmd:
                continue
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except (OSError, IndexError, ValueError):
            continue
    return peak


def worker(mode: str, path: str, work: str) -> None:
    sys.path.insert(0, str(REPO / "lib"))
    from dollyflow.config import load_config
    from dollyflow.engine.session import get_session

    cfg = load_config("ingest", [f"tables.warehouse={work}/wh-{mode}", f"ingest.input={path}",
                                 "spark.shuffle_partitions=8", "spark.driver_memory=4g"])
    spark = get_session(cfg.spark)
    spark.range(1).count()  # JVM warm-up outside the timing
    t0 = time.time()
    if mode == "baseline":
        spark.read.json(path).write.mode("overwrite").parquet(f"{work}/baseline.parquet")
        rows = None
    else:
        from dollyflow.jobs import ingest
        summary = ingest.run(cfg, spark)
        rows = summary["rows_new"]
    seconds = time.time() - t0
    print(json.dumps({"mode": mode, "seconds": seconds, "rows": rows,
                      "py_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "jvm_peak_mib": jvm_peak_kib() / 1024}))


def run(mode: str, path: Path, work: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", mode, "--corpus", str(path), "--work", str(work)],
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--work", default="/tmp/dollyflow-bench-ingest")
    ap.add_argument("--worker", choices=["baseline", "ours"])
    ap.add_argument("--corpus")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.corpus, args.work)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    big = corpus(args.records, work)
    small = corpus(max(args.records // 10, 1000), work)
    lines = sum(1 for _ in open(big, "rb"))
    for d in work.glob("wh-*"):
        shutil.rmtree(d)
    base = run("baseline", big, work)
    for d in work.glob("wh-*"):
        shutil.rmtree(d)
    ours = run("ours", big, work)
    for d in work.glob("wh-*"):
        shutil.rmtree(d)
    ours_small = run("ours", small, work)
    result = {
        "lines": lines, "corpus_mib": round(big.stat().st_size / 2**20, 1),
        "baseline_rec_s": round(lines / base["seconds"]), "ours_rec_s": round(lines / ours["seconds"]),
        "ratio": round(base["seconds"] / ours["seconds"], 3),
        "baseline_s": round(base["seconds"], 1), "ours_s": round(ours["seconds"], 1),
        "driver_peak_mib": {f"{lines} lines": {"python": round(ours["py_peak_mib"]), "jvm": round(ours["jvm_peak_mib"])},
                            f"{sum(1 for _ in open(small, 'rb'))} lines":
                                {"python": round(ours_small["py_peak_mib"]), "jvm": round(ours_small["jvm_peak_mib"])}},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
