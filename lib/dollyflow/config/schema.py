"""The configuration's schema: one dataclass per section, every field with its default and its
documentation (``field.metadata["doc"]``), and the paths derived from them (files_root, shards_root).

The YAML files under conf/ write the same defaults again, with comments for the reader;
tests/config/test_defaults.py checks that every value they write equals the default here, and
:func:`dollyflow.config.describe` prints a job's sections as commented YAML from these docs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

from dollyflow.config.errors import ConfigError
from dollyflow.config.redaction import REDACTED, redact

DOLLY_CATEGORIES = [
    "open_qa", "closed_qa", "information_extraction", "summarization",
    "brainstorming", "classification", "creative_writing", "general_qa",
]

TRAIN_LAUNCHERS = ("torch_distributor", "torchrun", "horovod")
TRAIN_METHODS = ("full", "lora")
PROMPT_FORMATS = ("dolly", "chat_template")
#: evaluate.baseline: what dollyflow pipeline compares the fine-tune with
BASELINES = ("none", "base")
DEEPSPEED_PRESETS = ("auto", "a100", "a10", "v100", "cpu")
GPT_NEOX_LORA_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


def setting(default: Any = dataclasses.MISSING, *, doc: str,
            factory: Callable[[], Any] = dataclasses.MISSING) -> Any:
    """A dataclass field with its documentation: ``setting(8, doc="...")`` or, for a mutable
    default, ``setting(factory=list, doc="...")``."""
    return field(default=default, default_factory=factory, metadata={"doc": doc})


@dataclass
class SparkConfig:
    """spark: the Spark session. A session that already exists (Databricks, spark-submit) is used
    as it is; these settings shape only the local session dollyflow starts itself."""
    master: str = setting("local[2]", doc="master of the local session; used only when no session exists and "
                                          "not under spark-submit")
    app_name: str = setting("dollyflow", doc="the Spark application name")
    shuffle_partitions: int = setting(8, doc="local only (spark.sql.shuffle.partitions and "
                                             "spark.default.parallelism); clusters keep their own setting")
    ui: bool = setting(False, doc="the local Spark UI on port 4040 when true")
    log_level: str = setting("ERROR", doc="log level of the local session (ERROR, WARN, INFO, ...)")
    driver_memory: str = setting("4g", doc="local only: spark.driver.memory")
    conf: dict[str, str] = setting(factory=dict, doc="extra Spark conf (key: value), applied locally; its values "
                                                     "are redacted wherever the config is written")
    delta_packages: str = setting("auto", doc="local only: Delta Lake's jars for the session dollyflow starts. auto: "
                                              "io.delta:delta-spark_<spark major.minor>_2.13 of the installed delta-spark "
                                              "(the newest published patch of its minor version), resolved through "
                                              "spark.jars.packages into the Ivy cache (~/.ivy2.5.2, once per machine); "
                                              "when it cannot be had (no network, not published) the session starts "
                                              "without it and tables.backend=auto uses delta-rs, saying why. off: no "
                                              "Delta jars. Or Maven coordinates, comma-separated "
                                              "(io.delta:delta-spark_4.2_2.13:4.4.0)")


def require_warehouse(warehouse: str) -> str:
    """The warehouse, or a clear error when none is set (the cluster env leaves it to the user)."""
    if not warehouse:
        raise ConfigError("tables.warehouse is empty: set it to shared storage every executor can reach, "
                          "e.g. tables.warehouse=s3://bucket/dollyflow (or abfss://, gs://, hdfs://)")
    return warehouse


@dataclass
class TablesConfig:
    """tables: where the Delta tables and the jobs' files live, and the tables' names (plain
    identifiers)."""
    warehouse: str = setting("warehouse", doc="local root for path-based tables (relative to the working dir); "
                                              "on a cluster a URI every executor reaches (s3://, abfss://, gs://, "
                                              "hdfs://)")
    catalog: str = setting("", doc="Unity Catalog catalog; when set, tables are catalog.schema.table")
    schema: str = setting("dollyflow", doc="the schema (database) of the tables")
    backend: str = setting("auto", doc="auto (native when Delta's JVM classes are there; the summaries say which "
                                       "and why) | native (fails without Delta) | offline (delta-rs through a "
                                       "Spark Python data source)")
    bronze: str = setting("bronze", doc="ingest: the accepted records")
    quarantine: str = setting("quarantine", doc="ingest: the lines that could not be accepted, with the reason")
    ingest_runs: str = setting("ingest_runs", doc="ingest: one accounting row per run")
    silver: str = setting("silver", doc="dedupe: bronze with one survivor per duplicate cluster")
    duplicates: str = setting("duplicates", doc="dedupe: the removed records with their cluster, survivor, kind "
                                                "and estimated similarity")
    dedupe_runs: str = setting("dedupe_runs", doc="dedupe: one row per run")
    tokenized: str = setting("tokenized", doc="tokenize: the tokenized records with their split")
    tokenize_runs: str = setting("tokenize_runs", doc="tokenize: one row per run")
    train_runs: str = setting("train_runs", doc="train: one row per run")
    predictions: str = setting("predictions", doc="infer: one generated response per input key, model and "
                                                  "parameters")
    eval_records: str = setting("eval_records", doc="evaluate: per-record metrics, one row per record, model and "
                                                    "parameter set (and silver version)")
    eval_runs: str = setting("eval_runs", doc="evaluate: one row per run: the models compared, the table versions, "
                                              "aggregates with bootstrap intervals")
    volume: str = setting("files", doc="Unity Catalog Volume under catalog.schema for files (shards, checkpoints, "
                                       "models) when catalog is set")
    shared_mounts: list[str] = setting(factory=list, doc="absolute local paths mounted on every node of the "
                                                         "cluster (NFS, a FUSE mount): a path under one of them "
                                                         "counts as shared storage when the Spark master is not "
                                                         "local (ingest.input, the shards root, the train output "
                                                         "and checkpoints, a local warehouse), e.g. [/mnt/shared]. "
                                                         "Empty: only URIs and Databricks' /Volumes, /dbfs, "
                                                         "/Workspace count")
    curated: str = setting("curated", doc="filter: silver's records that passed the filter, personal data "
                                          "redacted (what tokenize reads by default)")
    filtered: str = setting("filtered", doc="filter: every removed record with its stage, reason, detail and "
                                            "the offending span")
    filter_runs: str = setting("filter_runs", doc="filter: one row per run (counts per stage and reason, "
                                                  "redactions per kind)")

    def files_root(self) -> str:
        """Where the jobs' files go (shards, checkpoints, models, reports): the Unity Catalog
        Volume ``/Volumes/<catalog>/<schema>/<volume>`` when a catalog is set, else the warehouse."""
        if self.catalog:
            return f"/Volumes/{self.catalog}/{self.schema}/{self.volume}"
        return require_warehouse(self.warehouse).rstrip("/")


@dataclass
class ModelConfig:
    """model: the base model; a preset (conf/model/<preset>.yaml, --preset) sets this section."""
    name: str = setting("EleutherAI/pythia-2.8b", doc="hub name or local path of the base model")
    tokenizer: str = setting("", doc="hub name or local path of the tokenizer; empty: same as name")
    max_length: int = setting(2048, doc="the model's context length")

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer or self.name


@dataclass
class PromptConfig:
    """prompt: how a record becomes a prompt (chosen at tokenize; train, infer and dolly_generate read it from
    the shards' manifest and the model directory's provenance)."""
    format: str = setting("dolly", doc="dolly (Dolly's prompt and its three added special tokens) | chat_template "
                                       "(the tokenizer's own chat template: instruction and context as the user "
                                       "turn, the response as the assistant turn; no added tokens; the tokenizer "
                                       "must have a template)")
    system: str = setting("", doc="chat_template only: a system prompt put first in every conversation; empty: none")


@dataclass
class IngestConfig:
    """ingest: annotation records (JSON Lines / CSV / Parquet) -> bronze, bad lines -> quarantine,
    one accounting row per run -> ingest_runs."""
    input: str = setting("", doc="file, directory (recursive) or glob (* within one directory, ** across any: "
                                 "dir/**/*.jsonl); a local path or a cloud/Volume URI, e.g. "
                                 "../shared/data/dolly-sample.jsonl. Files of a directory/glob not read (hidden, "
                                 "_-prefixed, unknown extension) are listed with the reason in the summary and "
                                 "ingest_runs.skipped_files")
    format: str = setting("auto", doc="auto (by extension: .jsonl/.json/.ndjson, .csv, .parquet; .gz JSON Lines "
                                      "and CSV are streamed whole) | json | csv | parquet. A .json file starting "
                                      "with '[' is one JSON array of records (streamed element by element)")
    field_map: dict[str, str] = setting(factory=dict, doc="dolly field -> your column, e.g. {instruction: prompt, "
                                                          "response: answer}")
    categories: list[str] = setting(factory=lambda: list(DOLLY_CATEGORIES),
                                    doc="the accepted categories (Dolly's eight); empty: any")
    default_category: str = setting("", doc="used when the input has no category column at all")
    max_field_chars: int = setting(100_000, doc="a longer instruction/context/response (JSON or CSV) is "
                                                "quarantined as oversized_field; a line over 4x this many bytes "
                                                "as oversized_line (never read whole)")
    raw_max_chars: int = setting(2_000, doc="quarantined raw lines are truncated to this")
    chunk_bytes: int = setting(32 * 1024 * 1024, doc="JSON Lines files are cut into tasks of this many bytes "
                                                     "(>= 1; not .gz files)")


@dataclass
class DedupeConfig:
    """dedupe: bronze -> silver (one survivor per duplicate cluster), duplicates (the removed records
    with their cluster, survivor, kind and estimated similarity), one row per run -> dedupe_runs.
    Near duplicates: Jaccard(instruction+response) >= threshold AND Jaccard(context) >= threshold
    (or neither record has a context); each part is shingled and MinHashed on its own, so a shared
    passage alone never makes a duplicate. Survivor of a cluster: earliest ingested_at, then smallest
    record_id; cluster_id = survivor's record_id."""
    ngram: int = setting(2, doc="word n-gram size of the shingles; 2 keeps near copies at --edit-rate 0.03 "
                                "above 0.7 Jaccard")
    num_perm: int = setting(128, doc="MinHash permutations per signature (one signature per part)")
    threshold: float = setting(0.7, doc="Jaccard both parts must reach (instruction+response, and context; or "
                                        "instruction+response alone when neither has a context)")
    bands: int | None = setting(None, doc="LSH bands of the instruction+response signature; null: the optimal "
                                          "(bands, rows) for threshold and num_perm, as datasketch")
    rows: int | None = setting(None, doc="rows per band; null: chosen with bands")
    seed: int = setting(42, doc="seed of the hash permutations")
    bronze_version: int | None = setting(None, doc="bronze version to read; null: the current one (recorded in "
                                                   "dedupe_runs)")
    false_positive_weight: float = setting(0.2, doc="weight of the LSH false-positive area when bands/rows are "
                                                    "chosen: candidates are verified against the threshold, so "
                                                    "checking an extra pair costs little")
    false_negative_weight: float = setting(0.8, doc="weight of the LSH false-negative area: missing a pair costs "
                                                    "more than checking an extra one ((bands, rows) = (18, 7))")
    all_pairs_bucket: int = setting(8, doc="LSH buckets up to this size verify all pairs, larger ones a star")
    max_cc_iterations: int = setting(40, doc="connected-components rounds before giving up (an error)")
    skip_unchanged: bool = setting(True, doc="no new table versions when the bronze version and the parameters "
                                             "match the last run")


@dataclass
class TokenizeConfig:
    """tokenize: silver -> tokenized table + training shards (Parquet, balanced by tokens) with
    manifest.json and the tokenizer used. Prompts are Dolly's; only the response and "### End"
    count in the loss."""
    tokenizer: str = setting("", doc="empty: model.tokenizer (or model.name); a local path or a hub name")
    max_length: int | None = setting(None, doc="null: model.max_length; longer prompts are dropped (too_long), "
                                               "never truncated")
    test_size: float = setting(1000, doc="a count (a whole number >= 1, Dolly: 1000; 1 or 1.0 is one record) or "
                                         "a fraction in (0, 1); 0: no test split. Split by hash of record_id + "
                                         "seed")
    seed: int = setting(42, doc="seed of the split hash")
    num_shards: int = setting(8, doc="Parquet shards per split, balanced by tokens (fewer when a split has fewer "
                                     "records)")
    output_dir: str = setting("", doc="shards root. Empty: <warehouse>/shards/<silver> (local, cluster) or "
                                      "/Volumes/<catalog>/<schema>/<volume>/shards/<silver> (Databricks). Each run "
                                      "writes <root>/v<silver version>-<run id>/ and then switches "
                                      "<root>/LATEST.json to it; the trainer reads the root (or one version)")
    keep_versions: int = setting(3, doc="complete shard versions kept under the root; older ones are pruned")
    allow_local_output: bool = setting(False, doc="a plain local path is refused when executors run on other "
                                                  "hosts; true only when that path is a shared mount (NFS) on "
                                                  "every node")
    silver_version: int | None = setting(None, doc="version of the source table (source_table) to read; null: the "
                                                   "current one (recorded in the manifest)")
    mds: bool = setting(False, doc="also export Mosaic Streaming (MDS) under <shard dir>/mds (needs "
                                   "mosaicml-streaming)")
    skip_unchanged: bool = setting(True, doc="write nothing (skipped: true) when LATEST.json names shards built "
                                             "from the same silver version and settings (tokenizer sha256, "
                                             "max_length, test_size, seed, num_shards, format) and the tokenized "
                                             "table is still at the version they wrote")
    source_table: str = setting("curated", doc="the tables.<name> key tokenize reads: curated (the filter job's "
                                               "output) or silver (no filter)")


#: filter.pii: the kinds of personal data and what may be done with each
PII_KINDS = ("email", "phone", "credit_card", "ip_address", "iban", "person")
PII_ACTIONS = ("redact", "drop", "off")


@dataclass
class FilterConfig:
    """filter: silver (at a recorded version) -> curated (kept records, personal data redacted),
    filtered (every removed record: stage, reason, detail, offending span), one row per run ->
    filter_runs. Stages in order, the first that removes a record names it: pii, language,
    quality, decontaminate."""
    silver_version: int | None = setting(None, doc="silver version to read; null: the current one (recorded "
                                                   "in filter_runs)")
    pii: dict[str, str] = setting(factory=lambda: {"email": "redact", "phone": "redact", "credit_card": "drop",
                                                   "ip_address": "redact", "iban": "drop", "person": "off"},
                                  doc="per kind of personal data (email, phone, credit_card (Luhn-checked), "
                                      "ip_address, iban, person): redact (typed placeholder such as <EMAIL>, "
                                      "recorded in curated.redactions), drop (the record goes to filtered) or "
                                      "off. person needs a name model: only off is accepted")
    pii_min_score: float = setting(0.4, doc="presidio's pattern score a match needs (0..1); phone numbers "
                                            "score 0.4 without context words")
    phone_regions: list[str] = setting(factory=lambda: ["US", "GB", "DE", "FR", "IN", "CA", "AU"],
                                       doc="regions whose phone number formats are searched (fewer: faster)")
    languages: list[str] = setting(factory=lambda: ["en"], doc="ISO 639-1 codes of the languages kept "
                                                               "(detected on instruction + response)")
    detect_languages: list[str] = setting(factory=lambda: ["en", "fr", "de", "es", "it", "pt", "nl"],
                                          doc="ISO 639-1 codes the detector chooses among (with languages); "
                                              "fewer: faster")
    language_min_chars: int = setting(40, doc="instruction + response with fewer letters: kept, counted as "
                                              "undetermined (below the detector's reliable length)")
    min_response_words: int = setting(2, doc="responses with fewer words are removed (empty_response), except in "
                                             "short_answer_categories")
    short_answer_categories: list[str] = setting(factory=lambda: ["classification", "closed_qa", "open_qa",
                                                                  "information_extraction"],
                                                 doc="categories whose one-word answers are normal")
    repetition_min_words: int = setting(50, doc="the Gopher repetition rules apply to responses with at least "
                                                "this many words (Gopher's own minimum document length)")
    dup_line_frac: float = setting(0.3, doc="Gopher: removed when more than this fraction of the response's "
                                            "lines are duplicates (0..1)")
    top_ngram_frac: float = setting(0.2, doc="Gopher: the most frequent 2-gram may cover at most this fraction of "
                                             "the characters (3-grams: -0.02, 4-grams: -0.04) (0..1)")
    dup_ngram_frac: float = setting(0.15, doc="Gopher: duplicated 5-grams may cover at most this fraction of the "
                                              "characters (-0.01 per n up to 10-grams) (0..1)")
    min_alpha_words: float = setting(0.8, doc="Gopher: at least this fraction of the response's words must hold "
                                              "a letter (0..1), else non_alpha")
    alpha_min_words: int = setting(5, doc="the non_alpha rule applies to responses with at least this many words "
                                          "(a year or a number is an answer)")
    length_z: float = setting(4.0, doc="length_outlier: a response whose log word count lies more than this many "
                                       "robust deviations (1.4826 MAD) from its category's median")
    length_min_records: int = setting(50, doc="length_outlier applies only in categories with at least this many "
                                              "records")
    decontaminate: list[str] = setting(factory=list, doc="benchmark files (JSON Lines or Parquet; local paths or "
                                                         "URIs): records sharing a word n-gram with an item are "
                                                         "removed (benchmark_overlap); empty: no decontamination")
    decontaminate_fields: list[str] = setting(factory=lambda: ["question", "answer", "instruction", "input",
                                                               "context", "output", "response", "prompt",
                                                               "problem", "solution"],
                                              doc="the benchmark files' fields whose text is checked (those "
                                                  "present)")
    ngram: int = setting(13, doc="decontaminate: words per n-gram")
    skip_unchanged: bool = setting(True, doc="no new table versions when the silver version and the settings "
                                             "(benchmark files' sha256 included) match the last run")


@dataclass
class TrainConfig:
    """train: fine-tune the model on the tokenize job's shards with a raw DeepSpeed loop, launched on
    the cluster's workers by TorchDistributor (or torchrun without Spark, or Horovod). Output: a
    Hugging Face model directory (+ model card, provenance, metrics.jsonl), an MLflow run and one
    row in the train_runs table. "Dolly:" marks values taken from Dolly's own training run. Presets
    in conf/model/ may override any key."""
    # ---- input and output
    shard_dir: str = setting("", doc="a shard directory (manifest.json) or a shards root (LATEST.json); empty: "
                                     "the tokenize job's root, <files root>/shards/<silver>")
    output_dir: str = setting("", doc="local path or FUSE mount (/Volumes/..., /dbfs/..., NFS) every rank sees, "
                                      "or an object-store URI (staged locally, then uploaded: see staging_dir). "
                                      "Empty: <files root>/models/<model>-<method>-<first 8 hex of the manifest "
                                      "sha256>")
    checkpoint_dir: str = setting("", doc="empty: <output_dir>/checkpoints (must be a path every rank sees)")
    overwrite: bool = setting(False, doc="the fingerprint (manifest, model, weight-changing keys) is compared "
                                         "first: the same one is a no-op (or a resume) either way. Another one "
                                         "fails unless true: then the new model trains in "
                                         "<parent>/.<name>.next-<fingerprint> and replaces the old one only once "
                                         "complete (only files dollyflow wrote are removed)")
    # ---- launch
    launcher: str = setting("torch_distributor", doc="torch_distributor (Spark) | torchrun (no Spark) | horovod "
                                                     "(optional extra)")
    processes: int = setting(0, doc="ranks (one per GPU); 0: the GPUs the driver sees, else 1")
    local_mode: bool = setting(True, doc="TorchDistributor: true runs the ranks on the driver, false on executors "
                                         "(one task per process; set spark.task.resource.gpu.amount=1 on GPUs)")
    use_gpu: bool | None = setting(None, doc="null: true when the driver sees a CUDA GPU (or local_mode is false "
                                             "and spark.task.resource.gpu.amount is set)")
    deepspeed: str = setting("auto", doc="auto (by the GPU the ranks see: a100, a10, v100; cpu without CUDA), a "
                                         "preset in conf/deepspeed/ or a path to a DeepSpeed JSON file. Dolly: a100 "
                                         "(bf16 ZeRO-3), a10 (+ CPU optimizer offload), v100 (fp16 + offload)")
    zero_stage: int | None = setting(None, doc="null: the preset's ZeRO stage (GPU presets 3 as Dolly, cpu 2)")
    # ---- method
    method: str = setting("full", doc="full (Dolly) | lora (peft; fits pythia-2.8b/6.9b on one 24 GB GPU)")
    lora_r: int = setting(8, doc="LoRA rank")
    lora_alpha: int = setting(16, doc="LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = setting(0.05, doc="dropout on the LoRA branch")
    lora_target_modules: list[str] = setting(factory=lambda: list(GPT_NEOX_LORA_TARGETS),
                                             doc="modules LoRA adapts (default: GPT-NeoX attention + MLP; on "
                                                 "another architecture this default means [auto]) | [auto]: "
                                                 "peft's targets for the architecture (Llama/Qwen2/Mistral: "
                                                 "q_proj, v_proj) | [all-linear]: every linear layer")
    lora_train_new_tokens: bool = setting(True, doc="also train the embedding and output rows of Dolly's three "
                                                    "added tokens (peft trainable_token_indices): they are new, and "
                                                    "### End must be learned for generation to stop")
    lora_save: str = setting("both", doc="merged (HF model dir) | adapter (peft adapter only) | both (merged model "
                                         "at the top, the adapter in <output_dir>/adapter)")
    # ---- optimisation
    epochs: int = setting(2, doc="Dolly: 2")
    max_steps: int = setting(0, doc="stop after this many optimizer steps; 0: all epochs")
    learning_rate: float = setting(5e-6, doc="Dolly: 5e-6")
    lr_scheduler: str = setting("constant", doc="constant after warmup (Dolly: DeepSpeed WarmupLR) | cosine "
                                                "(WarmupCosineLR)")
    warmup_steps: int = setting(50, doc="Dolly: 50")
    warmup_type: str = setting("log", doc="Dolly: log (WarmupLR's default, which Dolly's config keeps) | linear")
    min_lr_ratio: float = setting(0.0, doc="cosine only: final lr as a fraction of learning_rate")
    weight_decay: float = setting(0.0, doc="Dolly: 0.0 (AdamW, the Trainer's default)")
    adam_beta1: float = setting(0.9, doc="Dolly: 0.9")
    adam_beta2: float = setting(0.999, doc="Dolly: 0.999")
    adam_eps: float = setting(1e-8, doc="Dolly: 1e-8")
    batch_size: int = setting(6, doc="records per micro-batch per rank. Dolly: 6 on A100 (4 on A10, 3 on V100)")
    batch_tokens: int = setting(0, doc="> 0: micro-batches hold up to this many padded tokens (rows x width) "
                                       "instead of batch_size records; must be >= the longest record")
    eval_batch_size: int = setting(0, doc="0: batch_size (Dolly: the same as the train batch)")
    grad_accum: int = setting(1, doc="micro-batches per optimizer step. Dolly: 1")
    gradient_clipping: float = setting(1.0, doc="max gradient norm. Dolly: 1.0 (the Trainer's default)")
    gradient_checkpointing: bool = setting(True, doc="Dolly: true")
    precision: str = setting("auto", doc="auto: bf16 on GPUs that have it, fp16 on older ones (Dolly's V100), "
                                         "fp32 on CPU | bf16 | fp16 | fp32")
    seed: int = setting(42, doc="Dolly: 42. Same seed, same data order on every rerun")
    group_size: int = setting(64, doc="length grouping: records are shuffled, cut into buckets of group_size "
                                      "micro-batches' worth, sorted by length inside a bucket, batched, and the "
                                      "batches shuffled (every record once per epoch)")
    pad_to_multiple_of: int = setting(8, doc="Dolly: 8")
    # ---- evaluation, checkpoints, logging
    eval_steps: int = setting(50, doc="eval loss on the test split (overall and per category) every N steps and "
                                      "at the end. Dolly: 50")
    save_steps: int = setting(200, doc="checkpoint every N steps. Dolly: 200")
    keep_checkpoints: int = setting(2, doc="complete checkpoints kept (oldest removed); 0 keeps all. Dolly: 20")
    log_steps: int = setting(10, doc="a log line (and the bar's postfix) every N steps. Dolly: 10")
    progress: str = setting("auto", doc="auto: a progress bar on a terminal, log lines otherwise | bar | log")
    mlflow: bool = setting(True, doc="track the run in MLflow (off, with a message, when mlflow is not installed)")
    mlflow_tracking_uri: str = setting("", doc="empty: the workspace server on Databricks, else "
                                               "file:<warehouse>/mlruns (local warehouse) or $MLFLOW_TRACKING_URI")
    mlflow_experiment: str = setting("", doc="empty: /Shared/dollyflow on Databricks, dollyflow elsewhere")
    mlflow_log_model: bool = setting(True, doc="also log the model with MLflow's transformers flavour when "
                                               "importable")
    timeout_minutes: int = setting(30, doc="timeout of collective operations (a hung rank fails the job after "
                                           "this)")
    staging_dir: str = setting("", doc="a URI output_dir (s3a://...) is trained into a local staging directory "
                                       "<staging_dir>/<name>-<hash>, then uploaded (the upload manifest last). "
                                       "Empty: ~/.cache/dollyflow/train-staging")


@dataclass
class InferConfig:
    """infer: batch generation with a fine-tuned model over a table -> the predictions Delta table.
    Every row gets Dolly's generation prompt (instruction + context as "Input:"), the model answers
    up to "### End"; one row per input key. The same generation is callable from SQL:
    dollyflow.engine.infer.register_udf(spark, cfg) registers dolly_generate(instruction[, context[,
    seed]]). Generation keeps Dolly's numbers (max_new_tokens 256, top_p 0.92, top_k 0, temperature 1)
    but decodes greedily by default: batch scoring must be reproducible."""
    model: str = setting("", doc="REQUIRED: the train job's output directory (shared storage on clusters: /dbfs, "
                                 "/Volumes), an MLflow URI (runs:/<run>/<path>, models:/<name>/<version>, "
                                 "models:/<name>@<alias>, models:/<name>/latest), an s3:// gs:// abfss:// file:// "
                                 "URI of such a directory, or a hub name (org/name or org/name@revision). "
                                 "Safetensors only. A path that does not exist is an error. Remote models are "
                                 "downloaded once per machine into a private cache ($DOLLYFLOW_MODEL_CACHE, else "
                                 "<tmp>/dollyflow-models-<uid>), keyed by what the source resolves to now. "
                                 "Credentials in a URI are redacted wherever the source is stored or printed")
    input_table: str = setting("silver", doc="logical table to score when query is empty")
    split: str = setting("test", doc="test | train | all: keep the input_table rows of that split of the "
                                     "tokenized table (by record_id), read at the tokenized version the model was "
                                     "trained from; all: no filter")
    query: str = setting("", doc="ONE SQL query giving the rows instead (e.g. \"SELECT * FROM silver WHERE "
                                 "category = 'closed_qa'\"); silver and tokenized are temp views under those "
                                 "names. Only a query is accepted (SELECT, WITH ... SELECT, VALUES, TABLE, FROM ... "
                                 "SELECT; checked by Spark's parser before it runs)")
    key_columns: list[str] = setting(factory=lambda: ["record_id"],
                                     doc="identify a row; must exist in the input (rows with a null key are "
                                         "skipped, duplicates keep one). Predictions are keyed on these + "
                                         "model_sha + params_sha")
    extra_columns: list[str] = setting(factory=list, doc="more input columns copied into predictions (e.g. "
                                                         "[category, instruction])")
    instruction_column: str = setting("instruction", doc="the input column holding the instruction")
    context_column: str = setting("context", doc="the input column holding the context; empty for inputs without "
                                                 "context")
    limit: int | None = setting(None, doc="score at most this many rows (smoke runs); null: all")
    mode: str = setting("append", doc="append: rows already predicted with this model + parameters are skipped, "
                                      "so a re-run adds nothing twice | overwrite: replace the rows of this "
                                      "model_sha + params_sha only, in one commit")
    retry_errors: bool = setting(True, doc="append: rows whose earlier prediction is an error are generated again "
                                           "and update the stored row only while it is still an error")
    function_name: str = setting("dolly_generate", doc="the SQL function name register_udf uses")
    max_new_tokens: int = setting(256, doc="Dolly: 256")
    do_sample: bool = setting(False, doc="Dolly: true (we default to greedy: reproducible batch scoring)")
    temperature: float = setting(1.0, doc="Dolly: 1.0 (only with do_sample)")
    top_p: float = setting(0.92, doc="Dolly: 0.92 (only with do_sample)")
    top_k: int = setting(0, doc="Dolly: 0 = off (only with do_sample)")
    seed: int = setting(42, doc="per-row seed = hash(seed, instruction, context) unless SQL passes one (only with "
                                "do_sample)")
    engine: str = setting("torch", doc="torch: the project's own batched generator (transformers' model, exact: greedy "
                                       "output equals model.generate) | ctranslate2: CTranslate2 (the optional "
                                       "extra dollyflow[ctranslate2]; the model converted once per model sha and "
                                       "compute type on each machine) | auto: ctranslate2 when it is installed and "
                                       "converts the model, else torch. Predictions of different engines or "
                                       "compute types never mix (params records them)")
    compute_type: str = setting("default", doc="ctranslate2 only: default | float32 | int8 | int8_float16 | "
                                               "bfloat16 | float16, checked against the device (cpu: float32, "
                                               "int8; default: float32 on cpu)")
    ct2_threads: int = setting(0, doc="ctranslate2 only: threads per generator (on CPUs, single-threaded replicas "
                                      "sharing one copy of the weights); 0: the infer job on CPUs runs one task "
                                      "per executor (unless partitions is set) with one replica per executor "
                                      "core; dolly_generate from SQL uses the task's cores")
    device: str = setting("auto", doc="auto: the task's GPU (Spark's gpu resource) when CUDA is there, else cpu | "
                                      "cpu | cuda | cuda:N")
    dtype: str = setting("auto", doc="auto: bf16 on Ampere+ GPUs, fp16 on older GPUs (V100), fp32 on cpu | "
                                     "float32 | bfloat16 | float16")
    batch_tokens: int = setting(16384, doc="the running batch holds rows x (cache width + max_new_tokens) <= this "
                                           "(KV cache size); raise it on big GPUs (pythia-2.8b in bf16: ~0.33 MB "
                                           "of KV cache per token, so 16384 tokens ~ 5.4 GB)")
    max_batch_size: int = setting(64, doc="rows per batch at most")
    window_rows: int = setting(256, doc="rows sorted by prompt length together (inside one Spark task)")
    partitions: int = setting(0, doc="tasks to spread the rows over; 0: the session's default parallelism (one "
                                     "per core or GPU)")


@dataclass
class EvaluateConfig:
    """evaluate: answer quality of the predictions against silver's reference responses -> the
    eval_records table (per record x model: ROUGE-1/2/L, BLEU, chrF, SQuAD token F1 and exact match,
    length ratio) and one eval_runs row (aggregates per category and overall with seeded 95% bootstrap
    intervals; with two or more models, the paired bootstrap of each against the first). Only records
    predicted by every compared model are compared. Headline metric per category: token F1 for
    closed_qa, information_extraction, classification; ROUGE-L for summarization; for the open-ended
    categories the judge score when judge_model is set, else ROUGE-L."""
    models: list[str] = setting(factory=list, doc="the models to compare, first = baseline A: each a model_sha "
                                                  "(or a prefix of 8+ hex digits), a model directory (hashed "
                                                  "like infer does), the predictions' model column as infer "
                                                  "wrote it, or an infer run_id; each matches every parameter "
                                                  "set it has in predictions (narrow with params_sha). Empty: "
                                                  "the model and parameters of the newest infer run")
    params_sha: list[str] = setting(factory=list, doc="keep only these parameter sets (predictions.params_sha); "
                                                      "empty: every parameter set of the models")
    silver_version: int | None = setting(None, doc="silver version whose response and category are the "
                                                   "reference; null: the current one (recorded)")
    seed: int = setting(42, doc="seed of the bootstrap resamples (each category its own stream)")
    resamples: int = setting(1000, doc="bootstrap resamples per interval")
    level: float = setting(0.95, doc="the intervals' coverage")
    partitions: int = setting(0, doc="tasks the scoring is spread over; 0: the session's default parallelism")
    harness_tasks: list[str] = setting(factory=list, doc="lm-evaluation-harness tasks run on the driver on each "
                                                         "side's model (pip install 'dollyflow[harness]'): lm-eval "
                                                         "task, group or tag names (their data comes from the hub) "
                                                         "and/or paths to task YAML files or directories of them (a "
                                                         "task on a local JSONL file runs offline); scores land in "
                                                         "eval_runs.harness. Empty: off")
    harness_limit: int | None = setting(None, doc="items per harness task; null: all of them")
    harness_batch_size: int = setting(8, doc="sequences per forward pass of the harness model")
    harness_device: str = setting("auto", doc="where the harness model runs: auto (cuda when there, else cpu), "
                                              "cpu, cuda or cuda:<i>")
    mlflow: bool = setting(True, doc="log the evaluation (headline per category with intervals, the differences, "
                                     "evaluation.json) to the MLflow run of each compared model the train job "
                                     "tracked (predictions.model_info), on the tracking URI it used; a failure "
                                     "is recorded in the summary, never fails the job")
    judge_model: str = setting("", doc="the optional judge: a causal LM in Dolly's prompt format (a train job "
                                       "output, databricks/dolly-v2-*), given like infer.model (a directory, an "
                                       "MLflow URI, a hub name; loaded the same way). For each compared record it "
                                       "is asked with a fixed rubric which of two answers is better, both orders; "
                                       "unparseable answers are counted, never guessed. Its judge score (wins + "
                                       "half the ties) heads open_qa, general_qa, brainstorming, creative_writing. "
                                       "Empty: no judge")
    judge_against: str = setting("baseline", doc="baseline: each side B, C ... against side A (with a single "
                                                 "side: reference, said in the summary) | reference: every side "
                                                 "against silver's human response (rows with an empty reference "
                                                 "are not judged)")
    judge_max_new_tokens: int = setting(16, doc="tokens the judge may answer with (the verdict is read from its "
                                                "first line)")
    judge_device: str = setting("auto", doc="as infer.device, for the judge")
    judge_dtype: str = setting("auto", doc="as infer.dtype, for the judge")
    judge_batch_tokens: int = setting(16384, doc="as infer.batch_tokens, for the judge")
    judge_max_batch_size: int = setting(64, doc="as infer.max_batch_size, for the judge")
    judge_window_rows: int = setting(128, doc="judged rows generated together (two prompts each, both orders), as "
                                              "infer.window_rows")
    baseline: str = setting("none", doc="dollyflow pipeline only: base: before the fine-tune's infer, also run infer "
                                        "with the untrained base model it started from (train's model.name with "
                                        "the shards' tokenizer, written beside the fine-tune as "
                                        "<model>-base-<sha8>; a hub name needs hub access) and, when evaluate."
                                        "models is empty, compare base (A) with the fine-tune (B); a base that "
                                        "cannot be had is reported and the fine-tune evaluated alone. none: the "
                                        "fine-tune alone. The quickstart sets base")


@dataclass
class StorageConfig:
    """storage: the object store (S3 or an S3-compatible server: MinIO, s3proxy, Ceph...) behind
    s3:// and s3a:// paths, one place for every client: Spark's s3a (fs.s3a.* on the local session;
    on spark-submit give the same as --conf spark.hadoop.fs.s3a.*), pyarrow (shards, models) and
    delta-rs (the offline backend). Secrets are never config values: the *_env keys name the
    environment variables holding them. Empty endpoint: each client's defaults (AWS, the
    instance profile)."""
    endpoint: str = setting("", doc="the S3 endpoint URL, e.g. http://minio:9000 (http:// turns TLS off); empty: "
                                    "AWS with each client's default credentials")
    region: str = setting("", doc="the region to sign for; empty: us-east-1")
    path_style: bool = setting(True, doc="path-style requests (http://host/bucket/key), as most S3-compatible "
                                         "servers want; false: virtual-hosted style (bucket.host)")
    access_key_env: str = setting("AWS_ACCESS_KEY_ID", doc="the environment variable holding the access key")
    secret_key_env: str = setting("AWS_SECRET_ACCESS_KEY", doc="the environment variable holding the secret key")
    hadoop_aws: str = setting("auto", doc="local only: the hadoop-aws jar Spark's s3a:// needs. auto: "
                                          "org.apache.hadoop:hadoop-aws at the version of pyspark's bundled Hadoop, "
                                          "added when the warehouse or a path is s3a:// (resolved like Delta's jars, "
                                          "once per machine; it pulls the AWS SDK bundle, about 700 MB); off; or "
                                          "Maven coordinates")


@dataclass
class Config:
    """The whole configuration: the run's identity, the layers chosen, and one section per part."""
    job: str = setting("", doc="the job being run (set by the command, not by a layer)")
    run_id: str = setting("", doc="the run's id, a plain name (it becomes a directory name); empty: generated "
                                  "per run (<job>-<UTC time>-<8 hex>)")
    preset: str = setting("", doc="model preset: conf/model/<preset>.yaml (--preset, $DOLLYFLOW_PRESET); "
                                  "empty: none")
    env: str = setting("", doc="environment: conf/env/<env>.yaml (--env, $DOLLYFLOW_ENV: local, databricks, "
                               "cluster); empty: none")
    spark: SparkConfig = setting(factory=SparkConfig, doc=SparkConfig.__doc__)
    tables: TablesConfig = setting(factory=TablesConfig, doc=TablesConfig.__doc__)
    model: ModelConfig = setting(factory=ModelConfig, doc=ModelConfig.__doc__)
    ingest: IngestConfig = setting(factory=IngestConfig, doc=IngestConfig.__doc__)
    dedupe: DedupeConfig = setting(factory=DedupeConfig, doc=DedupeConfig.__doc__)
    tokenize: TokenizeConfig = setting(factory=TokenizeConfig, doc=TokenizeConfig.__doc__)
    train: TrainConfig = setting(factory=TrainConfig, doc=TrainConfig.__doc__)
    infer: InferConfig = setting(factory=InferConfig, doc=InferConfig.__doc__)
    evaluate: EvaluateConfig = setting(factory=EvaluateConfig, doc=EvaluateConfig.__doc__)
    storage: StorageConfig = setting(factory=StorageConfig, doc=StorageConfig.__doc__)
    filter: FilterConfig = setting(factory=FilterConfig, doc=FilterConfig.__doc__)
    prompt: PromptConfig = setting(factory=PromptConfig, doc=PromptConfig.__doc__)

    def to_dict(self) -> dict[str, Any]:
        """Every key and value, secrets included: for this process only. What is written or
        logged anywhere (run records, model directories, MLflow, job output) is
        :meth:`redacted`."""
        return dataclasses.asdict(self)

    def redacted(self) -> dict[str, Any]:
        """:meth:`to_dict` safe to write where others can read it: every ``spark.conf`` value
        (where people put ``spark.hadoop.fs.s3a.secret.key``) replaced by ``***``, and every
        URI's user info and secret-looking query values (:func:`redact_uri`) too."""
        d = redact(self.to_dict())
        d["spark"]["conf"] = {k: REDACTED for k in self.spark.conf}
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def shards_root(cfg: Config) -> str:
    """The tokenize job's shards root: ``tokenize.output_dir``, else ``<files root>/shards/<silver>``.
    Each run writes a versioned directory under it and switches its ``LATEST.json`` pointer."""
    if cfg.tokenize.output_dir:
        return cfg.tokenize.output_dir.rstrip("/")
    return f"{cfg.tables.files_root()}/shards/{cfg.tables.silver}"
