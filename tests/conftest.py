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
    from dollyflow.testing.samples import generate_records, write_jsonl
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


SHARED_PASSAGE_QA = [  # different questions (and answers) about one passage, dolly closed_qa style
    ("When was Lamborghini founded, by whom, and why?",
     "Ferruccio Lamborghini, an Italian manufacturing magnate, founded Automobili Ferruccio "
     "Lamborghini S.p.A. in 1963 to compete with Ferrari."),
    ("Summarize the ownership history of Lamborghini from 1973 to 1998.",
     "After the 1973 downturn Ferruccio Lamborghini sold the company to Georges-Henri Rossetti and "
     "René Leimer. It went bankrupt in 1978, was run in receivership by the Mimran brothers from "
     "1980, who bought it by 1984 and sold it to Chrysler in 1987. Chrysler sold it to Mycom Setdco "
     "and V'Power in 1994, and they sold it to the Volkswagen Group, under Audi, in 1998."),
    ("Which engines power the cars that Lamborghini currently produces?",
     "The Aventador has a V12, the Huracán a V10 and the Urus SUV a twin-turbo V8."),
    ("Is Lamborghini Trattori part of the car company?",
     "No. Ferruccio Lamborghini founded Lamborghini Trattori in 1948 and it still makes tractors, "
     "but it has been a separate entity from the automobile manufacturer since 1973."),
    ("List the cars built by Squadra Corse upon customer request.",
     "Essenza SCV12, SC18 Alston and SC20."),
]


@pytest.fixture(scope="session")
def shared_passage(sample_path) -> dict:
    """Records asking different questions about one long passage (the real sample's longest
    context, 658 words, when ../shared is present; else ~650 generated words), plus a near copy of
    one of them (one word edited in the instruction and one in the response, same passage) and an
    exact copy (case and spaces) of another: {"passage", "questions", "near", "exact"}."""
    import json

    rows = [json.loads(line) for line in open(sample_path, encoding="utf-8") if line.strip()]
    passage = max((r.get("context") or "" for r in rows), key=lambda c: len(c.split()))
    if len(passage.split()) < 400:  # generated sample: build a long passage from its contexts
        words = " ".join(r["context"] for r in rows if r.get("context")).split()
        passage = " ".join(words[:650])
    assert len(passage.split()) >= 400
    questions = [{"instruction": q, "context": passage, "response": a, "category": "closed_qa"}
                 for q, a in SHARED_PASSAGE_QA]
    base = questions[1]
    near = dict(base, instruction=base["instruction"].replace("Summarize", "Summarise"),
                response=base["response"].replace("sold it to Chrysler", "sold it on to Chrysler"))
    exact = dict(questions[2], instruction="  " + questions[2]["instruction"].upper(),
                 response=questions[2]["response"].replace(" ", "  ", 2))
    return {"passage": passage, "questions": questions, "near": near, "exact": exact}


@pytest.fixture
def tmp_config(tmp_path):
    """tmp_config(job, *overrides) -> Config whose warehouse lies under this test's tmp_path."""
    from dollyflow.config import load_config

    def make(job: str = "", *overrides: str):
        return load_config(job, [f"tables.warehouse={tmp_path / 'warehouse'}",
                                 "spark.shuffle_partitions=4", *overrides])

    return make


def local_spark(delta: bool):
    """The local[2] session of the tests, without (``delta=False``: the offline backend) or with
    (``delta=True``: the native backend) Delta Lake's jars. One JVM at a time: when the running
    one is the other kind it is stopped and a new one started (a few seconds), so modules that
    use both keep each kind's tests together. Without the jars (no network, nothing cached) a
    native session skips, saying why, unless DOLLYFLOW_REQUIRE_NATIVE=1 (CI), where it fails."""
    pytest.importorskip("pyspark")
    from pyspark.sql import SparkSession

    from dollyflow.config import SparkConfig
    from dollyflow.engine.session import delta_jars_note, detect_delta, get_session, stop_local_session

    active = SparkSession.getActiveSession()
    if active is not None and (detect_delta(active)[0] is True) != delta:
        stop_local_session(active)
    session = get_session(SparkConfig(master="local[2]", shuffle_partitions=4, driver_memory="2g",
                                      delta_packages="auto" if delta else "off"))
    if delta and detect_delta(session)[0] is not True:
        why = f"no native Delta session: {delta_jars_note()}"
        if os.environ.get("DOLLYFLOW_REQUIRE_NATIVE") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return session


@pytest.fixture(scope="session")
def spark_of():
    """:func:`local_spark` for test modules that switch between the two kinds of session (a test
    module cannot import this conftest by name: other folders have a conftest too)."""
    return local_spark


@pytest.fixture(scope="module")
def spark():
    """A local[2] session without Delta's jars (the offline backend), shared by a module (and by
    every module while no test needs the native one)."""
    return local_spark(delta=False)


@pytest.fixture(scope="module")
def native_spark():
    """A local[2] session with Delta Lake's jars (the native backend), shared by a module."""
    return local_spark(delta=True)


@pytest.fixture(scope="session", autouse=True)
def _stop_spark_at_the_end():
    yield
    if "pyspark" in sys.modules:
        from pyspark.sql import SparkSession
        active = SparkSession.getActiveSession()
        if active is not None:
            from dollyflow.engine.session import stop_local_session
            stop_local_session(active)


@pytest.fixture(scope="session")
def tiny_model_factory():
    """tiny_model_factory(vocab_size, **kw) -> a random-weight GPTNeoXForCausalLM (pythia layout)."""
    pytest.importorskip("transformers")
    from dollyflow.core.models.build import tiny_gpt_neox
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


#: The environment variables the s3 fixtures put the test server's keys in (storage.*_env).
S3_KEY_ENV, S3_SECRET_ENV = "DOLLYFLOW_TEST_S3_ACCESS_KEY", "DOLLYFLOW_TEST_S3_SECRET_KEY"
S3_TEST_BUCKET = "dollyflow-test"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server process for the session: s3proxy (org.gaul:s3proxy from Maven
    Central, resolved once per machine into ~/.cache/dollyflow by mvn) on a free loopback port,
    objects under a tmp directory, with one empty bucket (``S3_TEST_BUCKET``); its keys are in
    ``$DOLLYFLOW_TEST_S3_ACCESS_KEY`` / ``$DOLLYFLOW_TEST_S3_SECRET_KEY``. Stopped at the end; its
    work directory (log: s3proxy.log, data/) stays under pytest's basetemp. Skips when s3proxy
    cannot be had (no mvn, no network, nothing cached) unless DOLLYFLOW_REQUIRE_NATIVE=1 (CI)."""
    from dollyflow.testing.s3proxy import S3Server, resolve

    try:
        jars = resolve()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        if os.environ.get("DOLLYFLOW_REQUIRE_NATIVE") == "1":
            pytest.fail(f"no S3 server: {exc}")
        pytest.skip(f"no S3 server: {exc}")
    server = S3Server(tmp_path_factory.mktemp("s3proxy"), jars).start()
    try:
        server.bucket = server.create_bucket(S3_TEST_BUCKET)
        os.environ[S3_KEY_ENV], os.environ[S3_SECRET_ENV] = server.access_key, server.secret_key
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_bucket(s3_server):
    """The test server's bucket as a URI factory with the credentials inside the URI (the old,
    still supported form): ``s3_bucket("s3a", "shards")`` ->
    ``s3a://KEY:SECRET@dollyflow-test/shards?endpoint_override=...&scheme=http``."""
    host = s3_server.endpoint[len("http://"):]

    def uri(scheme: str = "s3", prefix: str = "") -> str:
        return (f"{scheme}://{s3_server.access_key}:{s3_server.secret_key}@{S3_TEST_BUCKET}/{prefix.strip('/')}"
                f"?endpoint_override={host}&scheme=http&region=us-east-1")

    return uri


@pytest.fixture(scope="session")
def s3_storage(s3_server) -> list[str]:
    """Config overrides pointing the ``storage:`` section at the test server (keys by env name)."""
    return [f"storage.endpoint={s3_server.endpoint}", "storage.region=us-east-1", "storage.path_style=true",
            f"storage.access_key_env={S3_KEY_ENV}", f"storage.secret_key_env={S3_SECRET_ENV}"]


# Two short sample records the tiny Dolly model memorises (answers, then "### End").
DOLLY_FIXTURE_RECORDS = (1, 3)


@pytest.fixture(scope="session")
def dolly_records(sample_path) -> list[dict]:
    import json
    return [json.loads(line) for line in open(sample_path, encoding="utf-8")]


@pytest.fixture(scope="session")
def dolly_model_dir(tmp_path_factory, tokenizer_path, dolly_records) -> Path:
    """A Hugging Face model directory in the train job's layout, written by the train job's own
    writer (safetensors, the tokenizer with Dolly's tokens, generation_config eos = ### End,
    README.md, dollyflow_model.json) holding a tiny GPT-NeoX trained for a few hundred AdamW steps
    on two sample records, so that it really answers and stops at ### End. Built once per session."""
    pytest.importorskip("transformers")
    from dollyflow.testing.fixtures import tiny_dolly_model
    out = tmp_path_factory.mktemp("dolly-model") / "model"
    return tiny_dolly_model(out, tokenizer_path, [dolly_records[i] for i in DOLLY_FIXTURE_RECORDS])
