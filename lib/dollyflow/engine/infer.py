"""Spark glue for generation: the ``dolly_generate`` UDF, for DataFrames and SQL.

    from dollyflow.engine.infer import register_udf
    register_udf(spark, cfg)                      # cfg.infer: model, generation parameters, name
    spark.sql("SELECT record_id, dolly_generate(instruction, context).response FROM silver")
    spark.sql("SELECT dolly_generate('Name three primary colours.') AS g")

One UDF, three call forms: ``(instruction)``, ``(instruction, context)`` and
``(instruction, context, seed)`` (a per-row sampling seed, BIGINT). It returns
:data:`RESULT_DDL`: ``response``, ``finish_reason`` (stop | length | error), ``prompt_tokens``,
``completion_tokens``, ``error`` and ``trimmed_context_tokens``. Generation parameters come from
config, never from the rows. Select the struct once (``SELECT g.response, g.error FROM (SELECT
dolly_generate(...) AS g FROM t)``) so the model runs once per row.

Why an iterator pandas UDF and not ``pyspark.ml.functions.predict_batch_udf``:

- the model cache: predict_batch_udf keys its per-worker cache by a uuid made at each
  ``predict_batch_udf`` call, so every registration (each job run, each SQL session) loads the
  model again; ours is keyed by (model sha, device, dtype) in :func:`dollyflow.core.generation.worker_cache.cached`
  and survives re-registration for as long as Spark keeps the Python worker;
- the result: predict_batch_udf's struct results take only numeric/string/array fields and fail
  on None inside a list of dicts; ours returns nulls (``error`` is null on success) freely;
- batching: predict_batch_udf cuts fixed row counts; we buffer ``window_rows`` rows, sort them
  by length and batch them by a token budget (:mod:`dollyflow.core.generation`);
- one UDF that takes one, two or three arguments (SQL forms) and counts its model loads.

The model is loaded lazily by the first window a Python worker sees, once per worker (Spark
reuses workers across tasks with ``spark.python.worker.reuse``, the default), on the task's GPU
when Spark assigned one (``TaskContext.resources()["gpu"]``), else the first CUDA device, else
the CPU. Workers read a directory source where the driver found it (a shared path such as
``/dbfs`` or ``/Volumes`` on clusters) and fetch a remote one by the immutable identity the
driver resolved (the MLflow model version, the hub commit, the directory listing), once per
machine, into the private model cache (:func:`dollyflow.core.models.cache.model_cache_root`), or use
the driver's complete copy where they see it (the driver's machine). Before a
worker loads a model it hashes the weight files it is about to load (sha256, once per model and
Python worker, not per batch) and refuses them, naming both digests and the path, when they are
not the ones the driver hashed: every row is stamped with the driver's ``model_sha``.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Iterator, Tuple

import pandas as pd

from dollyflow.config import check_identifier
from dollyflow.core.generation import ct2
from dollyflow.core.generation.generator import Generator
from dollyflow.core.generation.params import GenerationParams
from dollyflow.core.generation.worker_cache import cached
from dollyflow.core.models.cache import cache_entry, fetched_copy, model_cache_root
from dollyflow.core.models.device import pick_device, pick_dtype
from dollyflow.core.models.fetch import fetch_model
from dollyflow.core.models.files import model_digest, tokenizer_dir_for
from dollyflow.core.models.loading import load_for_generation, prompt_format_of
from dollyflow.core.models.sources import ModelSource, locate_model
from dollyflow.core.storage import is_local_master, is_shared
from dollyflow.core.tokens import ensure_pad_token, load_tokenizer, set_single_thread
from dollyflow.engine.session import master_of

RESULT_FIELDS = (("response", "string"), ("finish_reason", "string"), ("prompt_tokens", "int"),
                 ("completion_tokens", "int"), ("error", "string"), ("trimmed_context_tokens", "int"))
RESULT_DDL = "struct<" + ", ".join(f"{n}: {t}" for n, t in RESULT_FIELDS) + ">"


@dataclass(frozen=True)
class InferSpec:
    """Everything a worker needs to generate, small enough to travel in the UDF's closure."""
    source: ModelSource              # the source as configured, resolved to an immutable identity
    model_dir: str                   # where the driver found it (the same path on workers for local/shared dirs)
    cache_entry: str                 # the driver's cache directory of a remote source ("" for a dir)
    digest: str                      # sha256 of the weight files (the predictions' model_sha), checked on workers
    params: GenerationParams = field(default_factory=GenerationParams)
    device: str = "auto"
    dtype: str = "auto"
    batch_tokens: int = 16384
    max_batch_size: int = 64
    window_rows: int = 256
    engine: str = "torch"            # torch | ctranslate2 (resolved: never auto)
    compute_type: str = "float32"    # ctranslate2: the quantization the model is converted to
    ct2_threads: int = 0
    shipped: str = ""                # the name of the driver's copy shipped with the job (ship_model); "" if not

    def identity(self) -> dict:
        """What decides the generated text besides the weights: the generation parameters, and
        for CTranslate2 the engine and compute type (the torch engine's identity is the
        parameters alone, as before engines existed, so its stored predictions keep matching)."""
        d = self.params.to_dict()
        if self.engine != "torch":
            d.update(engine=self.engine, compute_type=self.compute_type)
        return d

    def params_json(self) -> str:
        return json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))

    def params_sha(self) -> str:
        """16 hex digits of sha256 over :meth:`params_json` (the predictions table's key part)."""
        return hashlib.sha256(self.params_json().encode("utf-8")).hexdigest()[:16]


def resolve_engine(engine: str, compute_type: str, device: str, model_dir: str) -> tuple[str, str]:
    """(engine, compute type) for ``infer.engine`` / ``infer.compute_type``: ``auto`` picks
    CTranslate2 when it is installed and converts the model, else the torch core;
    ``ctranslate2`` without the package fails at once with the install hint. The compute type
    is checked against ``device`` when it is known here (``cpu``/``cuda``; ``auto`` is checked
    again on each worker's device); ``default`` converts to float32."""
    picked = engine == "auto"
    if picked:
        engine = "ctranslate2" if ct2.available() and ct2.supports(model_dir) else "torch"
    if engine == "torch":
        if compute_type != "default":
            why = (" (infer.engine=auto picked torch: " + ("ctranslate2 cannot convert this model)" if ct2.available()
                                                          else ct2.INSTALL_HINT + ")")) if picked else ""
            raise ValueError(f"infer.compute_type={compute_type!r} applies to infer.engine=ctranslate2 only; the "
                             f"torch engine's precision is infer.dtype{why}")
        return "torch", "float32"
    if engine != "ctranslate2":
        raise ValueError(f"infer.engine: {engine!r} is not one of torch, ctranslate2, auto")
    ct2.require()
    if not ct2.supports(model_dir):
        raise ValueError(f"infer.engine=ctranslate2: CTranslate2 cannot convert the model at {model_dir}; use "
                         "infer.engine=torch (or auto)")
    if device in ("cpu", "cuda") or device.startswith("cuda:"):
        ct2.check_compute_type(compute_type, "cuda" if device.startswith("cuda") else "cpu")
    return "ctranslate2", ("float32" if compute_type == "default" else compute_type)


def resolve_spec(infer_cfg) -> InferSpec:
    """On the driver: resolve the model source to an immutable identity, find the model there
    (downloading a remote one), hash its weights and freeze the generation parameters of
    ``cfg.infer``."""
    source = str(infer_cfg.model or "")
    if not source:
        raise ValueError("infer.model is empty: set it to the train job's output directory, an MLflow model "
                         "URI (runs:/..., models:/...) or a hub name")
    located = locate_model(source)
    model_dir = fetch_model(located)
    params = GenerationParams(max_new_tokens=infer_cfg.max_new_tokens, do_sample=infer_cfg.do_sample,
                              temperature=infer_cfg.temperature, top_p=infer_cfg.top_p, top_k=infer_cfg.top_k,
                              seed=infer_cfg.seed)
    engine, compute_type = resolve_engine(infer_cfg.engine, infer_cfg.compute_type, infer_cfg.device, model_dir)
    return InferSpec(source=located, model_dir=model_dir, cache_entry=cache_entry(located),
                     digest=model_digest(model_dir), params=params,
                     device=infer_cfg.device, dtype=infer_cfg.dtype, batch_tokens=infer_cfg.batch_tokens,
                     max_batch_size=infer_cfg.max_batch_size, window_rows=infer_cfg.window_rows,
                     engine=engine, compute_type=compute_type, ct2_threads=infer_cfg.ct2_threads)


def needs_shipping(spec: InferSpec, master: str, shared_mounts=()) -> bool:
    """Whether the workers could not read the driver's model themselves: on a master that is not
    ``local[...]``, a model directory that is not on shared storage (``tables.shared_mounts``
    counts), and any remote source (hub, MLflow, URI), which the driver downloaded into its own
    cache with its own credentials and workers would have to fetch again without them."""
    if is_local_master(master):
        return False
    return not (spec.source.kind == "dir" and is_shared(spec.model_dir, shared_mounts))


def ship_model(spark, spec: InferSpec, shared_mounts=()) -> InferSpec:
    """``spec``, with the driver's model copy shipped with the job when the workers need it
    (:func:`needs_shipping`): the directory packed once per model into an uncompressed tar in the
    driver's private model cache and added with ``SparkContext.addArchive``, so every executor gets
    it from the driver (no shared disk, no credentials) unpacked under ``SparkFiles`` as
    ``dollyflow-model-<sha16>.tar``; workers load that copy (after the same digest check). Without
    a SparkContext (Spark Connect) nothing can be shipped and ``spec`` is returned as it is."""
    if not needs_shipping(spec, master_of(spark), shared_mounts):
        return spec
    try:
        sc = spark.sparkContext
        sc.addArchive   # noqa: B018 - Spark Connect (and Databricks' shared clusters) have no SparkContext
    except Exception:
        return spec     # nothing can be shipped: the workers read or fetch the source themselves
    name = f"dollyflow-model-{spec.digest[:16]}.tar"
    shipped = getattr(sc, "_dollyflow_shipped", None)
    if shipped is None:
        shipped = sc._dollyflow_shipped = set()
    if name not in shipped:
        archive = os.path.join(model_cache_root(), name)
        if not os.path.isfile(archive):
            tmp = tempfile.NamedTemporaryFile(dir=model_cache_root(), prefix=f".{name}.", suffix=".tmp",
                                              delete=False)
            try:
                with tarfile.open(fileobj=tmp, mode="w") as tar:
                    for entry in sorted(os.listdir(spec.model_dir)):
                        if entry in ("checkpoints", ".runs") or entry.startswith(".dollyflow"):
                            continue     # training state, not the model
                        tar.add(os.path.join(spec.model_dir, entry), arcname=entry)
                tmp.close()
                os.replace(tmp.name, archive)
            except BaseException:
                tmp.close()
                os.unlink(tmp.name)
                raise
        sc.addArchive(archive)
        shipped.add(name)
    return replace(spec, shipped=name)


# ---------------------------------------------------------------------------------------------
# in the Python worker


def shipped_copy(spec: InferSpec) -> str | None:
    """The model directory the driver shipped with the job (:func:`ship_model`), unpacked on this
    executor; None when nothing was shipped."""
    if not spec.shipped:
        return None
    from pyspark import SparkFiles

    path = SparkFiles.get(spec.shipped)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise RuntimeError(f"the model the driver shipped as {spec.shipped} is not unpacked at {path} on this "
                           "executor")
    return path


def _task_gpus() -> list[str] | None:
    try:
        from pyspark import TaskContext
        ctx = TaskContext.get()
        if ctx is None:
            return None
        gpu = ctx.resources().get("gpu")
        return list(gpu.addresses) if gpu is not None else None
    except Exception:
        return None


def worker_model_dir(spec: InferSpec) -> str:
    """On a worker: the model directory for ``spec`` (the driver's directory for a ``dir``
    source; for a remote one the driver's complete copy when this machine sees it in a private
    cache of this user, else the source fetched by its pinned identity into this machine's
    cache), after checking that its weights hash to the driver's digest (the full sha256 of
    every weight file, so a stale copy of the same architecture and size is refused too)."""
    model_dir = shipped_copy(spec) or fetched_copy(spec.source, spec.cache_entry, spec.model_dir) or \
        fetch_model(spec.source)
    found = model_digest(model_dir)
    if found != spec.digest:
        raise RuntimeError(f"the model weights at {model_dir} (on this worker) have sha256 {found}, but the driver "
                           f"resolved {spec.source.display} to weights with sha256 {spec.digest}: refusing to "
                           "generate rows stamped with the driver's model_sha from other weights (was the model "
                           "rewritten during the job, or is this machine's copy stale?)")
    return model_dir


def _task_cpus() -> int:
    try:
        from pyspark import TaskContext
        ctx = TaskContext.get()
        return max(1, int(ctx.cpus())) if ctx is not None else 1
    except Exception:
        return 1


def worker_generator(spec: InferSpec):
    """(generator, model loaded now?) for this Python worker. The model and tokenizer are loaded
    once per (weights, device, dtype) and kept by :func:`dollyflow.core.generation.worker_cache.cached`; the
    Generator around them (parameters, batching) is cheap and made per call. With CTranslate2
    the model is converted once per (weights, compute type) on this machine, under a lock, into
    the model cache, and the CTranslate2 generator (``ct2_threads`` intra threads, default the
    task's cores) is kept the same way."""

    set_single_thread()
    device = pick_device(spec.device, _task_gpus())
    if spec.engine == "ctranslate2":
        return _ct2_generator(spec, device)
    dtype = str(pick_dtype(device, spec.dtype)).replace("torch.", "")

    def load():
        model_dir = worker_model_dir(spec)
        model, tokenizer = load_for_generation(model_dir, device=device, dtype=dtype)
        return model, tokenizer, prompt_format_of(model_dir, tokenizer)   # as the model was trained

    (model, tokenizer, fmt), loaded = cached((spec.digest, device, dtype), load)
    return Generator(model, tokenizer, spec.params, batch_tokens=spec.batch_tokens,
                     max_batch_size=spec.max_batch_size, prompt_format=fmt), loaded


def _ct2_generator(spec: InferSpec, device: str):
    kind = "cuda" if device.startswith("cuda") else "cpu"
    ct2.check_compute_type(spec.compute_type, kind)
    threads = spec.ct2_threads or _task_cpus()

    def load():
        model_dir = worker_model_dir(spec)
        converted = ct2.converted_dir(model_dir, spec.digest, spec.compute_type, model_cache_root())
        tokenizer = ensure_pad_token(load_tokenizer(tokenizer_dir_for(model_dir), dolly_tokens=False))
        # CPU: ``threads`` replicas of one thread each share one copy of the weights (faster than
        # one replica with several threads, and than one process per core with a copy each);
        # a GPU: one replica
        replicas, intra = (threads, 1) if kind == "cpu" else (1, threads)
        return ct2.CT2Generator(converted, tokenizer, spec.params, device=device, compute_type=spec.compute_type,
                                inter_threads=replicas, intra_threads=intra,
                                prompt_format=prompt_format_of(model_dir, tokenizer))

    return cached((spec.digest, "ctranslate2", device, spec.compute_type, threads, spec.params.digest()), load)


def _seed(v) -> int | None:
    if v is None or (isinstance(v, float) and v != v) or v is pd.NA:
        return None
    return int(v)


def _text(v):
    if v is None or v is pd.NA or (isinstance(v, float) and v != v):
        return None
    return v


def _frame(results) -> pd.DataFrame:
    return pd.DataFrame({
        "response": pd.array([r.response for r in results], dtype=object),
        "finish_reason": pd.array([r.finish_reason for r in results], dtype=object),
        "prompt_tokens": pd.array([r.prompt_tokens for r in results], dtype="Int32"),
        "completion_tokens": pd.array([r.completion_tokens for r in results], dtype="Int32"),
        "error": pd.array([r.error for r in results], dtype=object),
        "trimmed_context_tokens": pd.array([r.trimmed_context_tokens for r in results], dtype="Int32"),
    })


class LoadCounts:
    """A Spark accumulator param: {(event, pid): count} summed over tasks. Events: ``load``
    (a model loaded by a Python worker), ``load_ms`` (milliseconds those loads took, imports
    included), ``window`` (windows generated), ``task`` (UDF calls)."""

    def zero(self, value):
        return {}

    def addInPlace(self, a, b):
        for k, v in b.items():
            a[k] = a.get(k, 0) + v
        return a


def load_accumulator(spark):
    """A :class:`LoadCounts` accumulator, or None where the session has no SparkContext (Spark
    Connect): the job then reports no load counts."""
    try:
        from pyspark.accumulators import AccumulatorParam

        class _Param(LoadCounts, AccumulatorParam):
            pass
        return spark.sparkContext.accumulator({}, _Param())
    except Exception:
        return None


def summarize_counts(counts: dict | None) -> dict | None:
    """{"workers": n, "loads": total, "loads_per_worker": max, "load_seconds": the slowest
    worker's loading time (imports, tokenizer and weights; 0.0 when nothing was loaded),
    "windows": total, "tasks": total}."""
    if counts is None:
        return None
    by = {}
    for (event, pid), n in counts.items():
        by.setdefault(event, {})[pid] = n
    loads = by.get("load", {})
    return {"workers": len(set(by.get("task", {})) | set(loads)), "loads": sum(loads.values()),
            "loads_per_worker": max(loads.values(), default=0),
            "load_seconds": round(max(by.get("load_ms", {}).values(), default=0) / 1000, 3),
            "windows": sum(by.get("window", {}).values()), "tasks": sum(by.get("task", {}).values())}


def generate_udf(spec: InferSpec, counts=None):
    """The ``dolly_generate`` iterator pandas UDF for ``spec`` (see the module docstring).
    ``counts``: an optional :func:`load_accumulator`."""
    from pyspark.sql.functions import pandas_udf

    # CTranslate2's replicas each take batches of a window: a window per replica
    window = int(spec.window_rows) * (max(1, spec.ct2_threads) if spec.engine == "ctranslate2" else 1)

    def note(event: str, n: int = 1) -> None:
        if counts is not None:
            counts.add({(event, os.getpid()): n})

    @pandas_udf(RESULT_DDL)
    def dolly_generate(batches: Iterator[Tuple[pd.Series, ...]]) -> Iterator[pd.DataFrame]:
        note("task")
        gen = None
        pending: list[tuple] = []
        size = 0

        def flush():
            nonlocal gen, pending, size
            if gen is None:
                t0 = time.perf_counter()
                gen, built = worker_generator(spec)
                if built:
                    note("load")
                    note("load_ms", int(round((time.perf_counter() - t0) * 1000)))
            ins, ctx, seeds = [], [], []
            for cols in pending:
                n = len(cols[0])
                ins += [_text(v) for v in cols[0]]
                ctx += [_text(v) for v in cols[1]] if len(cols) > 1 else [None] * n
                seeds += [_seed(v) for v in cols[2]] if len(cols) > 2 else [None] * n
            pending, size = [], 0
            note("window")
            return _frame(gen.generate(ins, ctx, seeds))

        for batch in batches:
            cols = batch if isinstance(batch, tuple) else (batch,)
            if len(cols) > 3:
                raise TypeError("dolly_generate takes (instruction[, context[, seed]])")
            if len(cols[0]) == 0:
                continue
            pending.append(cols)
            size += len(cols[0])
            if size >= window:
                yield flush()
        if pending:
            yield flush()

    return dolly_generate


def register_udf(spark, cfg_or_spec, name: str | None = None, counts=None):
    """Register ``dolly_generate`` (or ``name``, default ``cfg.infer.function_name``) for SQL in
    ``spark`` and return the UDF (usable on DataFrames too). ``cfg_or_spec``: the project
    :class:`~dollyflow.config.Config` or an :class:`InferSpec`."""

    if isinstance(cfg_or_spec, InferSpec):
        spec, default = cfg_or_spec, "dolly_generate"
    else:
        spec, default = resolve_spec(cfg_or_spec.infer), cfg_or_spec.infer.function_name
    spec = ship_model(spark, spec, () if isinstance(cfg_or_spec, InferSpec) else cfg_or_spec.tables.shared_mounts)
    name = check_identifier(name or default, "function name")
    udf = generate_udf(spec, counts)
    spark.udf.register(name, udf)
    return udf
