#!/usr/bin/env python
"""Dedupe throughput and accuracy, ours against two baselines measured in the same run.

    .venv/bin/python bench/dedupe.py --records 100000 --workdir /tmp/dedupe-bench \\
        --baseline-dir /work/baselines/text-dedup-6bb8e89

Steps (all on one make_corpus corpus, ``--edit-rate`` 0.03 by default):

1. make the corpus and its truth file (``../shared/tools/make_corpus.py``), ingest it into a
   fresh bronze table (dollyflow ingest; not timed);
2. **ours**: ``jobs/dedupe.py`` as a subprocess on that bronze table (wall time, JVM start included);
3. **text-dedup** (baseline): ChenghaoMou/text-dedup's ``text_dedup/minhash_spark.py`` as of commit
   6bb8e89, the last version whose connected components run on RDDs (large-star/small-star) before
   it moved to GraphFrames. It is never copied into this project; obtain it with::

       git clone https://github.com/ChenghaoMou/text-dedup /tmp/text-dedup
       mkdir -p /work/baselines/text-dedup-6bb8e89/text_dedup
       git -C /tmp/text-dedup show 6bb8e89:text_dedup/minhash_spark.py \\
           > /work/baselines/text-dedup-6bb8e89/text_dedup/minhash_spark.py

   and pass that directory as ``--baseline-dir``. It needs numpy, pyspark and scipy. Its input is
   the same bronze rows exported to Parquet (``id`` = source line, ``content`` = instruction,
   context and response joined by newlines); it runs with the same threshold, n-gram size and
   number of permutations, on the same local Spark master and driver memory (wall time of the
   subprocess, JVM start included). Its output holds only the kept rows, so its clusters are
   recovered from a second, untimed ``--index_only`` run: the connected components of its LSH
   buckets are exactly the clusters its full run removes duplicates from;
4. **datasketch**: ``MinHashLSH`` in this single process (same normalisation, shingles,
   threshold and permutations as ours), query-then-insert per record, union-find clusters;
   like text-dedup it shingles each record as one text (instruction, context, response), the
   conventional rule, where ours compares instruction+response and context separately (so a
   shared passage alone never makes a duplicate, see :mod:`dollyflow.engine.dedupe`);
5. scores: pair-level precision/recall/F1 of each method's clusters against the truth file
   (:mod:`dollyflow.testing.dedupe_scoring`), records/s, and the ratios ours/baseline; peak RSS of
   our driver process (Python) and of its JVM, sampled every 0.2 s.

Prints one JSON object and writes it to ``<workdir>/result.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# bench/ holds scripts named like standard modules (tokenize.py): keep it off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
SHARED = Path(os.environ.get("DOLLYFLOW_SHARED", REPO.parent / "shared")).resolve()


# ---------------------------------------------------------------------------------------------
# process helpers


class PeakRss(threading.Thread):
    """Samples the RSS of a process and of its descendants until stopped (bytes)."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_root = 0
        self.peak_children = 0
        self._halt = threading.Event()

    def run(self):
        import psutil
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._halt.is_set():
            try:
                self.peak_root = max(self.peak_root, root.memory_info().rss)
                kids = 0
                for c in root.children(recursive=True):
                    try:
                        kids = max(kids, c.memory_info().rss)
                    except psutil.NoSuchProcess:
                        pass
                self.peak_children = max(self.peak_children, kids)
            except psutil.NoSuchProcess:
                return
            time.sleep(self.interval)

    def stop(self):
        self._halt.set()
        self.join(timeout=5)


def run_timed(cmd: list[str], env: dict | None = None, log: Path | None = None) -> dict:
    """Run a command, return wall seconds, return code and peak RSS (MiB) of it and its largest child."""
    t0 = time.time()
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    sampler = PeakRss(proc.pid)
    sampler.start()
    rc = proc.wait()
    sampler.stop()
    if log:
        out.close()
    return {"seconds": round(time.time() - t0, 2), "rc": rc,
            "peak_rss_mib": round(sampler.peak_root / 2**20, 1),
            "peak_child_rss_mib": round(sampler.peak_children / 2**20, 1)}


# ---------------------------------------------------------------------------------------------
# corpus and ingest


def make_corpus(records: int, edit_rate: float, seed: int, workdir: Path) -> tuple[Path, Path]:
    corpus, truth = workdir / "corpus.jsonl", workdir / "truth.jsonl"
    if not corpus.exists() or not truth.exists():
        subprocess.run([sys.executable, str(SHARED / "tools" / "make_corpus.py"),
                        str(SHARED / "data" / "dolly-sample.jsonl"), "--records", str(records),
                        "--edit-rate", str(edit_rate), "--seed", str(seed),
                        "--out", str(corpus), "--truth", str(truth)], check=True)
    return corpus, truth


def job_command(name: str) -> list[str]:
    """The command running a dollyflow job's CLI (what jobs/<name>.py does, without putting
    jobs/ first on sys.path, where jobs/tokenize.py would shadow the standard library)."""
    return [sys.executable, "-c", f"from dollyflow.cli import run_job; raise SystemExit(run_job({name!r}))"]


def table_path(warehouse: Path, name: str) -> Path:
    return warehouse / "dollyflow" / name


# ---------------------------------------------------------------------------------------------
# ours


def run_ours(warehouse: Path, overrides: list[str], workdir: Path) -> dict:
    cmd = [*job_command("dedupe"), f"tables.warehouse={warehouse}",
           "dedupe.skip_unchanged=false", *overrides]
    res = run_timed(cmd, log=workdir / "ours.log")
    if res["rc"] != 0:
        raise RuntimeError(f"our dedupe failed, see {workdir / 'ours.log'}")
    text = (workdir / "ours.log").read_text()
    res["summary"] = json.loads(text[text.index("{"):])
    return res


def ours_clusters(warehouse: Path) -> dict[str, str]:
    """record_id -> cluster_id for every removed record (survivors label themselves)."""
    from deltalake import DeltaTable
    t = DeltaTable(str(table_path(warehouse, "duplicates"))).to_pyarrow_table(columns=["record_id", "cluster_id"])
    return dict(zip(t.column("record_id").to_pylist(), t.column("cluster_id").to_pylist()))


def bronze_rows(warehouse: Path, columns: list[str]):
    from deltalake import DeltaTable
    return DeltaTable(str(table_path(warehouse, "bronze"))).to_pyarrow_table(columns=columns)


# ---------------------------------------------------------------------------------------------
# text-dedup baseline


def export_baseline_input(warehouse: Path, out_dir: Path) -> int:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    t = bronze_rows(warehouse, ["source_line", "instruction", "context", "response"])
    content = pc.binary_join_element_wise(t.column("instruction"), t.column("context"), t.column("response"), "\n")
    table = pa.table({"id": t.column("source_line").cast(pa.int64()), "content": content})
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    # Several files of small row groups, so that Spark splits its input evenly over the cores
    # (one 1M-row row group would be read by a single task).
    step = max(1, -(-table.num_rows // 8))
    for i, start in enumerate(range(0, table.num_rows, step)):
        pq.write_table(table.slice(start, step), out_dir / f"part-{i}.parquet", row_group_size=16_384)
    return table.num_rows


def baseline_env(master: str, driver_memory: str, partitions: int) -> dict:
    env = dict(os.environ)
    env["PYSPARK_PYTHON"] = sys.executable
    env["PYSPARK_DRIVER_PYTHON"] = sys.executable
    env["PYSPARK_SUBMIT_ARGS"] = (f"--master {master} --driver-memory {driver_memory} "
                                  f"--conf spark.sql.shuffle.partitions={partitions} "
                                  f"--conf spark.ui.enabled=false pyspark-shell")
    return env


def run_baseline(script: Path, input_dir: Path, workdir: Path, args, index_only: bool = False) -> dict:
    out = workdir / ("td_index_run" if index_only else "td_output")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(script), "--input", str(input_dir), "--threshold", str(args.threshold),
           "--ngram_size", str(args.baseline_ngram or args.ngram),
           "--num_perm", str(args.baseline_num_perm or args.num_perm), "--column", "content",
           "--index_column", "id", "--output", str(out)]
    if index_only:
        cmd += ["--output_index", str(workdir / "td_index"), "--index_only"]
    res = run_timed(cmd, env=baseline_env(args.master, args.driver_memory, args.partitions),
                    log=workdir / ("td_index.log" if index_only else "td.log"))
    if res["rc"] != 0:
        raise RuntimeError(f"text-dedup failed (rc {res['rc']}), see {workdir}")
    return res


def baseline_clusters(workdir: Path) -> dict[int, int]:
    """id (source line) -> component, from the index-only output: connected components of the
    graph linking every member of an LSH bucket to the bucket's smallest id."""
    import numpy as np
    import pyarrow.dataset as ds
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    files = sorted(str(f) for f in (workdir / "td_index").rglob("*.parquet"))  # dirs named __pid__=N
    t = ds.dataset(files, format="parquet").to_table()
    key = t.column("__key__").combine_chunks()
    band = key.field(0).to_numpy(zero_copy_only=False)
    value = key.field(1).to_pylist()
    ids = t.column("__id__").to_numpy()
    import pandas as pd
    df = pd.DataFrame({"band": band, "value": value, "id": ids})
    df["bucket"] = df.groupby(["band", "value"], sort=False).ngroup()
    df["root"] = df.groupby("bucket")["id"].transform("min")
    edges = df[df["id"] != df["root"]]
    nodes, inverse = np.unique(np.concatenate([ids, edges["id"].to_numpy(), edges["root"].to_numpy()]),
                               return_inverse=True)
    a = inverse[len(ids):len(ids) + len(edges)]
    b = inverse[len(ids) + len(edges):]
    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(len(nodes), len(nodes)))
    _, labels = connected_components(graph, directed=False)
    return dict(zip(nodes.tolist(), labels.tolist()))


# ---------------------------------------------------------------------------------------------
# datasketch baseline


def run_datasketch(warehouse: Path, args) -> tuple[dict, dict[str, str]]:
    """Single-process MinHashLSH over the bronze rows: returns (timing, record_id -> cluster root)."""
    from datasketch import MinHash, MinHashLSH

    from dollyflow.core.text import normalized_document
    t = bronze_rows(warehouse, ["record_id", "instruction", "context", "response"])
    rids = t.column("record_id").to_pylist()
    ins, ctx, res = (t.column(c).to_pylist() for c in ("instruction", "context", "response"))
    parent: dict[str, str] = {}

    def find(x):
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])
            x = parent[x]
        return x

    t0 = time.time()
    lsh = MinHashLSH(threshold=args.threshold, num_perm=args.num_perm)
    n = args.ngram
    for rid, i, c, r in zip(rids, ins, ctx, res):
        words = normalized_document(i, c, r).split()
        grams = {" ".join(words[k:k + n]) for k in range(max(1, len(words) - n + 1))} if words else set()
        if not grams:
            continue
        m = MinHash(num_perm=args.num_perm, seed=args.seed)
        m.update_batch([g.encode("utf-8") for g in grams])
        for other in lsh.query(m):
            ra, rb = find(rid), find(other)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
        lsh.insert(rid, m, check_duplication=False)
    seconds = time.time() - t0
    return {"seconds": round(seconds, 2)}, {rid: find(rid) for rid in rids}


# ---------------------------------------------------------------------------------------------


def score(by_record: dict[str, object], line_ids: dict[int, str], truth: dict) -> dict:
    from dollyflow.testing.dedupe_scoring import score_records
    return score_records(by_record, line_ids, truth).to_dict()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--edit-rate", type=float, default=0.03)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dollyflow-bench-dedupe"))
    ap.add_argument("--baseline-dir", type=Path, default=None,
                    help="checkout holding text_dedup/minhash_spark.py at commit 6bb8e89 (see the docstring)")
    ap.add_argument("--no-baseline-f1", action="store_true", help="skip text-dedup's untimed index-only run")
    ap.add_argument("--no-datasketch", action="store_true")
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--ngram", type=int, default=2)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--baseline-ngram", type=int, default=None, help="text-dedup's n-gram size (default: --ngram)")
    ap.add_argument("--baseline-num-perm", type=int, default=None,
                    help="text-dedup's permutations (default: --num-perm; its own default is 250)")
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--driver-memory", default="4g")
    ap.add_argument("--partitions", type=int, default=8, help="spark.sql.shuffle.partitions for both")
    args = ap.parse_args(argv)

    from dollyflow.testing.dedupe_scoring import line_record_ids, read_truth
    from dollyflow.core.minhash import optimal_bands
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    corpus, truth_path = make_corpus(args.records, args.edit_rate, args.seed, work)
    warehouse = work / "warehouse"
    spark_overrides = [f"spark.master={args.master}", f"spark.driver_memory={args.driver_memory}",
                       f"spark.shuffle_partitions={args.partitions}"]
    if not table_path(warehouse, "bronze").exists():
        ing = run_timed([*job_command("ingest"), f"ingest.input={corpus}",
                         f"tables.warehouse={warehouse}", *spark_overrides], log=work / "ingest.log")
        if ing["rc"] != 0:
            raise RuntimeError(f"ingest failed, see {work / 'ingest.log'}")
    truth = read_truth(truth_path)
    line_ids = line_record_ids(corpus)
    bronze_n = bronze_rows(warehouse, ["record_id"]).num_rows
    result = {"records": args.records, "bronze_rows": bronze_n, "edit_rate": args.edit_rate,
              "threshold": args.threshold, "ngram": args.ngram, "num_perm": args.num_perm,
              "master": args.master,
              "cpus": os.cpu_count()}

    dd = [f"dedupe.threshold={args.threshold}", f"dedupe.ngram={args.ngram}", f"dedupe.num_perm={args.num_perm}"]
    ours = run_ours(warehouse, spark_overrides + dd, work)
    ours["records_per_s"] = round(bronze_n / ours["seconds"], 1)
    ours_params = json.loads(ours["summary"]["parameters"])
    result["ours_bands_rows"] = [ours_params["bands"], ours_params["rows"]]
    result["text_dedup_params"] = {  # its bands/rows: the datasketch optimum with equal weights
        "ngram": args.baseline_ngram or args.ngram, "num_perm": args.baseline_num_perm or args.num_perm,
        "bands_rows": list(optimal_bands(args.threshold, args.baseline_num_perm or args.num_perm))}
    ours["scores"] = score(ours_clusters(warehouse), line_ids, truth)
    result["ours"] = ours
    print(json.dumps({"ours": ours}, indent=1), flush=True)

    if args.baseline_dir:
        script = args.baseline_dir.resolve() / "text_dedup" / "minhash_spark.py"
        input_dir = work / "td_input"
        export_baseline_input(warehouse, input_dir)
        td = run_baseline(script, input_dir, work, args)
        td["records_per_s"] = round(bronze_n / td["seconds"], 1)
        if not args.no_baseline_f1:
            td["index_run"] = run_baseline(script, input_dir, work, args, index_only=True)
            comp = baseline_clusters(work)
            lines_by_rid = dict(zip(*[c.to_pylist() for c in bronze_rows(warehouse, ["record_id", "source_line"]).columns]))
            td["scores"] = score({rid: comp.get(line, ("own", line)) for rid, line in lines_by_rid.items()},
                                 line_ids, truth)
        result["text_dedup"] = td
        result["speedup_vs_text_dedup"] = round(td["seconds"] / ours["seconds"], 2)
        print(json.dumps({"text_dedup": td}, indent=1), flush=True)

    if not args.no_datasketch:
        ds_time, ds_clusters = run_datasketch(warehouse, args)
        ds_time["records_per_s"] = round(bronze_n / ds_time["seconds"], 1)
        ds_time["scores"] = score(ds_clusters, line_ids, truth)
        result["datasketch"] = ds_time
        result["speedup_vs_datasketch"] = round(ds_time["seconds"] / ours["seconds"], 2)

    print(json.dumps(result, indent=1))
    (work / "result.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
