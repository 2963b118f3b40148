import pytest

from dollyflow.config import Config, ConfigError, check_identifier, load_config, parse_override


def test_defaults_and_layers_resolve():
    cfg = load_config("ingest")
    assert isinstance(cfg, Config)
    assert cfg.model.name == "EleutherAI/pythia-2.8b"      # preset from defaults.yaml
    assert cfg.spark.master == "local[2]"
    assert cfg.run_id.startswith("ingest-")
    assert "open_qa" in cfg.ingest.categories


def test_preset_env_and_override_order():
    cfg = load_config("ingest", ["model.max_length=256", "tables.schema=s1"], preset="tiny", env="cluster")
    assert cfg.model.name == "tiny-gpt-neox"               # preset
    assert cfg.tables.backend == "native"                  # env
    assert cfg.model.max_length == 256                     # override beats preset
    assert cfg.tables.schema == "s1"


def test_override_can_select_preset():
    assert load_config("x", ["preset=pythia-70m"]).model.name == "EleutherAI/pythia-70m"


def test_override_values_are_typed():
    cfg = load_config("", ["ingest.categories=[a, b]", "ingest.field_map={instruction: prompt}",
                           "dedupe.false_positive_weight=1", "run_id=20240101"])
    assert cfg.ingest.categories == ["a", "b"]
    assert cfg.ingest.field_map == {"instruction": "prompt"}
    assert cfg.dedupe.false_positive_weight == 1.0 and isinstance(cfg.dedupe.false_positive_weight, float)
    assert cfg.run_id == "20240101"


def test_unknown_key_names_key_and_source():
    with pytest.raises(ConfigError, match=r"unknown key 'dedupe.thresh'.*override"):
        load_config("", ["dedupe.thresh=0.5"])
    with pytest.raises(ConfigError, match=r"unknown key 'nope'"):
        load_config("", ["nope=1"])


def test_wrong_type_names_key_and_source(tmp_path):
    conf = tmp_path / "conf"
    (conf / "jobs").mkdir(parents=True)
    (conf / "defaults.yaml").write_text("spark:\n  shuffle_partitions: many\n")
    with pytest.raises(ConfigError, match=r"spark.shuffle_partitions: expected int.*defaults.yaml"):
        load_config("", conf=conf)
    with pytest.raises(ConfigError, match=r"ui: expected bool"):
        load_config("", ["spark.ui=maybe"])


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError, match=r"unknown preset 'pythia-99b'.*pythia-70m"):
        load_config("", preset="pythia-99b")


@pytest.mark.parametrize("bad", ["bronze; DROP TABLE x", "a.b", "`x`", "", "1abc", "x y"])
def test_table_names_must_be_identifiers(bad):
    with pytest.raises(ConfigError):
        check_identifier(bad, "t")
    with pytest.raises(ConfigError):
        load_config("", [f"tables.silver={bad!r}"] if bad else ["tables.silver="])


def test_parse_override_shapes():
    assert parse_override("a.b.c=3") == {"a": {"b": {"c": 3}}}
    assert parse_override("a=") == {"a": ""}
    with pytest.raises(ConfigError):
        parse_override("no-equals")


@pytest.mark.parametrize("value", [
    "SELECT a, b FROM t WHERE x = 'a: b' # c",      # ': ' and ' #' inside a query
    "SELECT * FROM silver # all of it",
    "/data/exports/run #3/part: a.jsonl",             # a path
    "a # c",
    "0.8 # not a comment",
    "key: value",                                     # a block mapping in YAML: text here
    "- item",                                         # a block list in YAML: text here
    "2024-01-01",                                     # a date in YAML: text here
])
def test_override_value_with_colon_or_hash_is_taken_whole(value):
    assert parse_override(f"infer.query={value}") == {"infer": {"query": value}}
    cfg = load_config("", [f"infer.query={value}"])
    assert cfg.infer.query == value


@pytest.mark.parametrize("raw,expected", [
    ("0.8", 0.8), ("true", True), ("null", None), ("~", None), ("", ""), ("20240101", 20240101),
    ("[a, b]", ["a", "b"]), ("{k: v}", {"k": "v"}), ("'x: y # z'", "x: y # z"), ('"q"', "q"),
    ("5e-6", "5e-6"), ("plain words", "plain words"),
])
def test_override_scalars_and_flow_collections_are_yaml(raw, expected):
    assert parse_override(f"a.b={raw}") == {"a": {"b": expected}}


def test_override_typed_values_still_coerce():
    cfg = load_config("", ["train.learning_rate=5e-6", "run_id=20240101", "dedupe.threshold=0.8",
                           "train.mlflow=false", "dedupe.bands=null", "tokenize.output_dir=/x/a: b #1"])
    assert cfg.train.learning_rate == 5e-6 and cfg.run_id == "20240101" and cfg.dedupe.threshold == 0.8
    assert cfg.train.mlflow is False and cfg.dedupe.bands is None
    assert cfg.tokenize.output_dir == "/x/a: b #1"
    with pytest.raises(ConfigError, match=r"dedupe.threshold: expected float, got str '0.8 # x'"):
        load_config("", ["dedupe.threshold=0.8 # x"])


def test_cli_config_prints_resolved(capsys):
    from dollyflow.cli import main
    assert main(["config", "ingest", "--preset", "tiny", "ingest.max_field_chars=7"]) == 0
    out = capsys.readouterr().out
    assert "max_field_chars: 7" in out and "tiny-gpt-neox" in out
    assert main(["config", "ingest", "bogus.key=1"]) == 2


@pytest.mark.parametrize("override,key", [
    ("dedupe.threshold=0", "dedupe.threshold"), ("dedupe.threshold=1", "dedupe.threshold"),
    ("dedupe.threshold=1.5", "dedupe.threshold"), ("dedupe.threshold=-0.1", "dedupe.threshold"),
    ("dedupe.threshold=.nan", "dedupe.threshold"),
    ("ingest.chunk_bytes=0", "ingest.chunk_bytes"), ("ingest.chunk_bytes=-5", "ingest.chunk_bytes"),
    ("dedupe.num_perm=0", "dedupe.num_perm"), ("tokenize.num_shards=0", "tokenize.num_shards"),
    ("tokenize.keep_versions=0", "tokenize.keep_versions"), ("ingest.max_field_chars=0", "ingest.max_field_chars"),
    ("tokenize.max_length=0", "tokenize.max_length"), ("dedupe.bands=0", "dedupe.bands"),
    ("tokenize.silver_version=-1", "tokenize.silver_version"),
    ("tokenize.test_size=1.5", "tokenize.test_size"), ("tokenize.test_size=-1", "tokenize.test_size"),
    ("tokenize.test_size=.inf", "tokenize.test_size"),
])
def test_out_of_range_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        load_config("", [override])


def test_in_range_values_and_how_test_size_is_read():
    from dollyflow.core.split import parse_test_size
    cfg = load_config("", ["dedupe.threshold=0.99", "ingest.chunk_bytes=1", "tokenize.num_shards=1",
                           "tokenize.test_size=1.0"])
    assert cfg.dedupe.threshold == 0.99 and cfg.tokenize.num_shards == 1
    assert parse_test_size(cfg.tokenize.test_size) == ("count", 1)      # 1.0 is one record, not 100%
    assert parse_test_size(load_config("", ["tokenize.test_size=0.999"]).tokenize.test_size) == ("fraction", 0.999)
    assert parse_test_size(load_config("", ["tokenize.test_size=0"]).tokenize.test_size) == ("count", 0)


def test_infer_section_defaults_and_checks():
    from dollyflow.config import ConfigError, load_config
    inf = load_config("infer").infer
    # Dolly's generation numbers, decoded greedily by default (reproducible batch scoring)
    assert (inf.max_new_tokens, inf.top_p, inf.top_k, inf.temperature, inf.do_sample) == (256, 0.92, 0, 1.0, False)
    assert inf.key_columns == ["record_id"] and inf.split == "test" and inf.mode == "append"
    assert load_config("infer").tables.predictions == "predictions"
    for bad in ("infer.mode=upsert", "infer.split=dev", "infer.key_columns=[]", "infer.max_new_tokens=0",
                "infer.function_name=drop table", "infer.key_columns=[a-b]"):
        with pytest.raises(ConfigError, match="infer"):
            load_config("infer", [bad])


# ---- issue 18: names that become path segments; secrets never written


@pytest.mark.parametrize("bad", ["..", ".", "a/b", "../x", "x/..", "a\\b", "c:d", ".hidden", "a..b"])
def test_run_id_must_be_a_plain_name(bad):
    with pytest.raises(ConfigError, match="run_id: .* is not a plain name"):
        load_config("ingest", [f"run_id={bad}"])


def test_plain_run_ids_pass():
    for ok in ("job-123-ingest", "20240101", "a.b_c-d", "_x"):
        assert load_config("ingest", [f"run_id={ok}"]).run_id == ok


def test_redacted_config_hides_spark_conf_values_uri_user_info_and_secret_query_keys():
    from dollyflow.config import redact_uri

    cfg = load_config("infer", ["spark.conf={spark.hadoop.fs.s3a.secret.key: TOPSECRET, spark.x: '1'}",
                                "infer.model=s3a://AKIAXX:TOPSECRET@bucket/models/m",
                                "ingest.input=https://acct.blob.core.windows.net/c/raw?sv=2022&sig=TOPSECRET&se=1",
                                "train.shard_dir=s3://b/shards?endpoint_override=h:9&access_token=TOPSECRET"])
    d = cfg.redacted()
    text = str(d)
    assert "TOPSECRET" not in text and "AKIAXX" not in text
    assert d["spark"]["conf"] == {"spark.hadoop.fs.s3a.secret.key": "***", "spark.x": "***"}
    assert d["infer"]["model"] == "s3a://***@bucket/models/m"
    assert d["ingest"]["input"].endswith("?sv=2022&sig=***&se=1")
    assert d["train"]["shard_dir"] == "s3://b/shards?endpoint_override=h:9&access_token=***"
    assert cfg.spark.conf["spark.hadoop.fs.s3a.secret.key"] == "TOPSECRET"     # the live config keeps it
    assert redact_uri("models:/dolly@champion") == "models:/dolly@champion"
    assert redact_uri("jdbc:postgresql://h/db?user=u&password=p") == "jdbc:postgresql://h/db?user=u&password=***"
