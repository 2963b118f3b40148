"""Shared fixtures: a local Spark session, ../shared inputs (skipping clearly when absent),
generated fallbacks, tokenizers and a tiny pythia-architecture model."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DOLLYFLOW_SHARED", REPO.parent / "shared")).resolve()
NO_SHARED = f"../shared is absent ({SHARED}); this test needs its real data/tools"


def shared_or_skip(rel: str) -> Path:
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"{NO_SHARED}: missing {rel}")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(NO_SHARED)
    return SHARED


@pytest.fixture(scope="session")
def sample_path(tmp_path_factory) -> Path:
    """100 real dolly-15k records from ../shared, else 100 generated ones."""
    real = SHARED / "data" / "dolly-sample.jsonl"
    if real.is_file():
        return real
    from dollyflow.core.samples import generate_records, write_jsonl
    return write_jsonl(generate_records(100), tmp_path_factory.mktemp("sample") / "sample.jsonl")


@pytest.fixture(scope="session")
def gpt_neox_tokenizer_path() -> Path:
    return shared_or_skip("assets/gpt-neox-20b")


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory, sample_path) -> Path:
    """The real GPT-NeoX tokenizer when ../shared is present, else a small BPE trained here."""
    real = SHARED / "assets" / "gpt-neox-20b"
    if real.is_dir():
        return real
    import json

    from dollyflow.core.tokens import train_small_tokenizer
    texts = []
    for line in open(sample_path, encoding="utf-8"):
        r = json.loads(line)
        texts += [r["instruction"], r["context"], r["response"]]
    out = tmp_path_factory.mktemp("tokenizer")
    train_small_tokenizer(texts, out)
    return out


@pytest.fixture(scope="session")
def make_corpus(tmp_path_factory):
    """make_corpus(records, **flags) -> (corpus, truth), from ../shared/tools/make_corpus.py with
    the real sample as its seed. Cached per argument set."""
    tool = SHARED / "tools" / "make_corpus.py"
    seed = SHARED / "data" / "dolly-sample.jsonl"
    cache: dict = {}

    def build(records: int, **flags):
        if not tool.is_file() or not seed.is_file():
            pytest.skip(f"{NO_SHARED}: missing tools/make_corpus.py")
        key = (records, tuple(sorted(flags.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("corpus")
            args = [sys.executable, str(tool), str(seed), "--records", str(records),
                    "--out", str(out / "corpus.jsonl"), "--truth", str(out / "truth.jsonl")]
            for k, v in flags.items():
                flag = "--" + k.replace("_", "-")
                args += [flag] if v is True else [flag, str(v)]
            subprocess.run(args, check=True, capture_output=True)
            cache[key] = (out / "corpus.jsonl", out / "truth.jsonl")
        return cache[key]

    return build


@pytest.fixture
def tmp_config(tmp_path):
    """tmp_config(job, *overrides) -> Config whose warehouse lies under this test's tmp_path."""
    from dollyflow.config import load_config

    def make(job: str = "", *overrides: str):
        return load_config(job, [f"tables.warehouse={tmp_path / 'warehouse'}",
                                 "spark.shuffle_partitions=4", *overrides])

    return make


@pytest.fixture(scope="session")
def spark():
    """One local[2] session for the whole run (pyspark and Java required)."""
    pytest.importorskip("pyspark")
    from dollyflow.config import SparkConfig
    from dollyflow.engine.session import get_session
    session = get_session(SparkConfig(master="local[2]", shuffle_partitions=4, driver_memory="2g"))
    yield session
    session.stop()


@pytest.fixture(scope="session")
def tiny_model_factory():
    """tiny_model_factory(vocab_size, **kw) -> a random-weight GPTNeoXForCausalLM (pythia layout)."""
    pytest.importorskip("transformers")
    from dollyflow.core.model import tiny_gpt_neox
    return tiny_gpt_neox


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


# Two short sample records the tiny Dolly model memorises (answers, then "### End").
DOLLY_FIXTURE_RECORDS = (1, 3)


@pytest.fixture(scope="session")
def dolly_records(sample_path) -> list[dict]:
    import json
    return [json.loads(line) for line in open(sample_path, encoding="utf-8")]


@pytest.fixture(scope="session")
def dolly_model_dir(tmp_path_factory, tokenizer_path, dolly_records) -> Path:
    """A Hugging Face model directory shaped like the train job's output (safetensors, the
    tokenizer with Dolly's tokens, generation_config eos = [### End, eos], README.md,
    dollyflow_model.json) holding a tiny GPT-NeoX trained for a few hundred AdamW steps on two
    sample records, so that it really answers and stops at ### End. Built once per session."""
    pytest.importorskip("transformers")
    from dollyflow.core.fixtures import tiny_dolly_model
    out = tmp_path_factory.mktemp("dolly-model") / "model"
    return tiny_dolly_model(out, tokenizer_path, [dolly_records[i] for i in DOLLY_FIXTURE_RECORDS])
