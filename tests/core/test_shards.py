"""Shard planning, manifest, verification, versions under a root, the trainer's reader and collate,
the MDS export (no Spark)."""
import hashlib
import json

import numpy as np
import pyarrow as pa
import pytest

from dollyflow.core.prompt import RESPONSE_KEY_NL
from dollyflow.core.shards import (ShardDataset, build_manifest, collate, export_mds, histogram_edges, manifest_sha256,
                                   mds_available, plan_shards, prune_versions, read_manifest, read_pointer,
                                   resolve_shard_dir, shard_count, shard_file_name, shard_settings, shard_starts,
                                   unchanged_shards, verify_shards, write_manifest, write_pointer, write_shard)
from dollyflow.core.split import assign_splits, split_keys
from dollyflow.core.storage import join, upload_dir
from dollyflow.core.tokens import backend_from_json, encode_records, load_tokenizer, save_tokenizer


def test_plan_balances_tokens_and_is_deterministic():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 2000, size=1000)
    keys = rng.integers(0, 2**62, size=1000)
    plan = plan_shards(lengths, keys, 8)
    loads = np.bincount(plan, weights=lengths, minlength=8)
    assert set(plan.tolist()) == set(range(8))
    assert np.abs(loads - lengths.sum() / 8).max() <= lengths.max()      # within one record of the mean
    order = np.argsort(keys)
    assert (np.diff(plan[order]) >= 0).all()                             # contiguous ranges of split keys
    rids = [f"r{i}" for i in range(1000)]
    starts = shard_starts(plan, keys, rids)
    assert len(starts) == 7
    assert [sum((int(k), r) >= st for st in starts) for k, r in zip(keys, rids)] == plan.tolist()
    tied = plan_shards([10, 10, 10, 10], [5, 5, 5, 5], 2, ["d", "c", "b", "a"])
    assert tied.tolist() == [1, 1, 0, 0]                                 # equal keys: record id decides
    assert (plan_shards(lengths, keys, 8) == plan).all()
    assert shard_count(8, 3) == 3 and set(plan_shards([5, 6, 7], [1, 2, 3], 8).tolist()) == {0, 1, 2}
    with pytest.raises(ValueError):
        shard_count(0, 10)


def test_histogram_edges():
    assert histogram_edges(2048) == [0, 64, 128, 256, 512, 1024, 2048, 2049]
    assert histogram_edges(300) == [0, 64, 128, 256, 301]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, sample_path, tokenizer_path):
    """A shard directory built with the core only, as the job does per shard."""
    recs = [json.loads(line) for line in open(sample_path, encoding="utf-8")]
    d = tmp_path_factory.mktemp("shards")
    tok = load_tokenizer(tokenizer_path)
    info = save_tokenizer(tok, d / "tokenizer")
    backend = backend_from_json((d / "tokenizer" / "tokenizer.json").read_text())
    max_length = 1024
    enc = encode_records(backend, [r["instruction"] for r in recs], [r["context"] for r in recs],
                         [r["response"] for r in recs], max_length)
    rids = [f"r{i:04d}" for i in range(len(recs))]
    keep = [i for i, reason in enumerate(enc.drop_reason) if reason is None]
    splits = assign_splits([rids[i] for i in keep], 10)
    edges = histogram_edges(max_length)
    per_split = {}
    for split in ("train", "test"):
        idx = [i for i, s in zip(keep, splits) if s == split]
        keys = split_keys([rids[i] for i in idx])
        plan = plan_shards([enc.length[i] for i in idx], keys, 4)
        n = shard_count(4, len(idx))
        per_split[split] = []
        for s in range(n):
            rows = sorted((k, i) for k, i, p in zip(keys, idx, plan) if p == s)
            table = pa.table({"record_id": [rids[i] for _, i in rows],
                              "category": [recs[i]["category"] for _, i in rows],
                              "input_ids": [enc.input_ids[i] for _, i in rows],
                              "response_start": [enc.response_start[i] for _, i in rows],
                              "length": [enc.length[i] for _, i in rows]})
            per_split[split].append(write_shard(table, str(d / shard_file_name(split, s, n)), edges))
    manifest = build_manifest(source={"table": "silver", "version": 3}, tokenizer={**info, "dir": "tokenizer"},
                              max_length=max_length, seed=42, test_size=10, edges=edges,
                              split_shards=per_split, drops={"too_long": enc.drop_reason.count("too_long")})
    write_manifest(str(d), manifest)
    return d, enc, rids, tok


def test_manifest_describes_the_shards(shard_dir):
    d, enc, _, _ = shard_dir
    m = read_manifest(d)
    assert verify_shards(d) == []
    kept = [n for n, r in zip(enc.length, enc.drop_reason) if r is None]
    assert m["records"] == len(kept) and m["tokens"] == sum(kept)
    assert m["splits"]["test"]["records"] == 10 and len(m["splits"]["train"]["shards"]) == 4
    assert m["source"] == {"table": "silver", "version": 3}
    assert manifest_sha256(d) == hashlib.sha256((d / "manifest.json").read_bytes()).hexdigest()
    assert m["drops"]["too_long"] == enc.drop_reason.count("too_long")
    h = m["splits"]["train"]["length_histogram"]
    assert sum(h["counts"]) == m["splits"]["train"]["records"] and len(h["counts"]) == len(h["edges"]) - 1
    for s in m["splits"].values():
        assert sum(c["records"] for c in s["categories"].values()) == s["records"]


def test_verify_detects_tampering(shard_dir, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(shard_dir[0], d)
    victim = sorted(d.glob("train-*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[:-8] + b"\0" * 8)
    problems = verify_shards(d)
    assert any(victim.name in p for p in problems)


def test_dataset_yields_dolly_labels(shard_dir):
    d, enc, rids, tok = shard_dir
    ds = ShardDataset(d, "train")
    items = list(ds)
    assert len(items) == len(ds) == read_manifest(d)["splits"]["train"]["records"]
    by_id = {r: i for i, r in enumerate(rids)}
    resp = tok.convert_tokens_to_ids(RESPONSE_KEY_NL)
    for ex in items[:30]:
        i = by_id[ex["record_id"]]
        assert ex["input_ids"].tolist() == enc.input_ids[i]
        start = enc.response_start[i]
        assert (ex["labels"][:start] == -100).all()
        assert ex["labels"][start:].tolist() == enc.input_ids[i][start:]
        assert ex["input_ids"][start - 1] == resp
    assert [ds[k]["record_id"] for k in range(len(ds))] == [e["record_id"] for e in items]
    assert ds[-1]["record_id"] == items[-1]["record_id"]
    # data-parallel readers see disjoint shards covering the split
    parts = [ShardDataset(d, "train", rank=r, world_size=3) for r in range(3)]
    assert sum(len(p) for p in parts) == len(ds)
    assert sorted(e["record_id"] for p in parts for e in p) == sorted(e["record_id"] for e in items)
    assert ShardDataset(d, "train").tokenizer_dir == str(d / "tokenizer")


def test_collate_pads_with_eos_and_ignores_padding():
    a = {"input_ids": np.array([5, 6, 7]), "labels": np.array([-100, 6, 7])}
    b = {"input_ids": np.array([8]), "labels": np.array([8])}
    batch = collate([a, b], pad_token_id=0, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def test_root_pointer_resolves_to_a_complete_version(shard_dir, tmp_path):
    """A shards root holds versioned directories; LATEST.json names the one to read; a copied
    root still resolves (relative names); pruning keeps the newest complete ones."""
    import shutil

    root = tmp_path / "root"
    for i, name in enumerate(["v1-a", "v2-b", "v3-c"]):
        shutil.copytree(shard_dir[0], root / name)
        m = read_manifest(root / name)
        m["created_at"] = f"2026-01-0{i + 1}T00:00:00+00:00"
        write_manifest(str(root / name), m)
    (root / "v4-crashed").mkdir()          # no manifest: a run that died; never picked, never pruned
    with pytest.raises(FileNotFoundError, match="run the tokenize job"):
        resolve_shard_dir(str(root))
    write_pointer(str(root), "v2-b", run_id="b")
    assert resolve_shard_dir(str(root)) == str(root / "v2-b")
    assert resolve_shard_dir(str(root / "v3-c")) == str(root / "v3-c")   # a version dir is itself
    assert read_pointer(str(root))["run_id"] == "b"
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    assert resolve_shard_dir(str(moved)) == str(moved / "v2-b")
    assert prune_versions(str(root), keep=1, protect=("v2-b",)) == ["v1-a"]
    assert sorted(p.name for p in root.iterdir() if p.name != ".LATEST.lock") == ["LATEST.json", "v2-b", "v3-c", "v4-crashed"]
    assert len(ShardDataset(resolve_shard_dir(str(root)), "train")) == read_manifest(shard_dir[0])["splits"]["train"]["records"]


def test_shards_read_and_verify_over_s3(shard_dir, s3_bucket):
    """The reader, verification and the pointer work on an object store (a real S3 endpoint)."""
    root = s3_bucket("s3a", "core-shards")
    upload_dir(shard_dir[0], join(root, "v3-x"))
    write_pointer(root, "v3-x")
    d = resolve_shard_dir(root)
    assert d == join(root, "v3-x")
    assert verify_shards(d) == []
    assert [e["record_id"] for e in ShardDataset(d, "train")] == \
           [e["record_id"] for e in ShardDataset(shard_dir[0], "train")]


def test_mds_export_without_streaming_says_what_to_install(shard_dir, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "streaming", None)      # "import streaming" now raises ImportError
    assert mds_available() is False
    with pytest.raises(RuntimeError, match="pip install mosaicml-streaming"):
        export_mds(shard_dir[0])


def test_unchanged_shards_matches_source_version_and_every_setting(shard_dir, tmp_path):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(shard_dir[0], root / "v3-a")
    settings = shard_settings(tokenizer_sha256="abc", max_length=1024, test_size=10, seed=42, num_shards=4)
    m = read_manifest(root / "v3-a")
    m["source"]["location"] = "/wh/silver"
    m["settings"] = settings
    write_manifest(str(root / "v3-a"), m)
    assert unchanged_shards(str(root), "/wh/silver", 3, settings) is None          # no pointer yet
    write_pointer(str(root), "v3-a")
    got = unchanged_shards(str(root), "/wh/silver", 3, settings)
    assert got["_dir"] == str(root / "v3-a") and got["run_id"] == m["run_id"]
    assert unchanged_shards(str(root), "/wh/silver", 4, settings) is None
    assert unchanged_shards(str(root), "/wh/other", 3, settings) is None
    for change in ({"tokenizer_sha256": "abd"}, {"max_length": 2048}, {"test_size": 0.1}, {"seed": 7},
                   {"num_shards": 8}):
        assert unchanged_shards(str(root), "/wh/silver", 3, {**settings, **change}) is None, change


def test_pointer_never_moves_back_to_an_older_silver_version(tmp_path):
    """Two runs finishing out of order: the pointer stays at the newer silver version and the
    older run learns its shards are not current; of two runs over one version, the one started
    later wins whatever order they finish in; pointers without versions are replaced as before."""
    root = str(tmp_path / "root")
    silver = "/wh/dollyflow/silver"
    p5 = write_pointer(root, "v5-b", run_id="b", silver=silver, silver_version=5, started_at="2026-01-01T10:00:00")
    assert p5["moved"] is True and read_pointer(root)["dir"] == "v5-b"
    p3 = write_pointer(root, "v3-a", run_id="a", silver=silver, silver_version=3, started_at="2026-01-01T11:00:00")
    assert p3["moved"] is False and p3["dir"] == "v5-b" and p3["silver_version"] == 5
    assert read_pointer(root)["dir"] == "v5-b"
    # same version: the run started earlier does not replace the one started later
    early = write_pointer(root, "v5-c", run_id="c", silver=silver, silver_version=5, started_at="2026-01-01T09:00:00")
    assert early["moved"] is False and read_pointer(root)["dir"] == "v5-b"
    late = write_pointer(root, "v5-d", run_id="d", silver=silver, silver_version=5, started_at="2026-01-01T12:00:00")
    assert late["moved"] is True and read_pointer(root)["dir"] == "v5-d"
    newer = write_pointer(root, "v6-e", run_id="e", silver=silver, silver_version=6, started_at="2026-01-01T08:00:00")
    assert newer["moved"] is True and read_pointer(root)["dir"] == "v6-e"
    # another silver table's shards in the same root are not ordered against these: last write wins
    other = write_pointer(root, "v1-f", run_id="f", silver="/wh/other", silver_version=1, started_at="2026-01-01")
    assert other["moved"] is True and read_pointer(root)["dir"] == "v1-f"
    assert write_pointer(root, "by-hand")["moved"] is True and read_pointer(root)["dir"] == "by-hand"
