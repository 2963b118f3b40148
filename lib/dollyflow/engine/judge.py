"""Spark glue of the evaluate job's optional judge: which rows are judged against what, and the
judging itself on the workers with the project's batched generator.

- :func:`resolve_judge` (driver): ``evaluate.judge_model`` resolved, fetched and hashed exactly as
  infer resolves ``infer.model`` (:func:`dollyflow.engine.infer.resolve_spec`, greedy with
  ``evaluate.judge_max_new_tokens``), its tokenizer checked for Dolly's prompt tokens, and what
  each side is judged against: ``baseline`` (every side after A against A; with one side it falls
  back to ``reference`` and says so) or ``reference`` (every side against silver's human response).
- :func:`judge_rows`: one row per judged (record, side): the task from silver at the evaluated
  version, ``answer_1`` (the baseline's prediction or the reference), ``answer_2`` (the side's
  prediction) and ``judge_key``, the sha256 of everything that decides the verdict (the judge's
  weights and parameters, the rubric, what it is judged against, both answers): a stored verdict
  with the same key is not judged again.
- :func:`judge_verdicts`: a ``mapInPandas`` over those rows: windows of rows, both orders of each
  row (:func:`dollyflow.core.evaluation.judge.judge_prompts`) generated in one batched call of the
  :class:`~dollyflow.core.generation.generator.Generator` that infer uses (one model load per
  Python worker, :func:`dollyflow.engine.infer.worker_generator`), each answer parsed strictly
  (:func:`~dollyflow.core.evaluation.judge.parse_verdict`) and the two combined
  (:func:`~dollyflow.core.evaluation.judge.combine`): win, tie, loss for the side, or unparseable.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Iterator

import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from dollyflow.config import InferConfig
from dollyflow.core.evaluation.judge import QUESTION, RUBRIC, UNPARSEABLE, combine, judge_prompts, parse_verdict
from dollyflow.core.models.files import tokenizer_dir_for
from dollyflow.core.models.loading import check_dolly_tokenizer
from dollyflow.core.tokens import load_tokenizer
from dollyflow.engine.evaluate import RECORD_KEYS, Side
from dollyflow.engine.infer import InferSpec, resolve_spec, worker_generator

BASELINE, REFERENCE = "baseline", "reference"
#: The judge's columns in eval_records (null on rows no judge has judged).
JUDGE_FIELDS = (("judge_verdict", "string"), ("judge_first", "string"), ("judge_second", "string"),
                ("judge_error", "string"), ("judge_sha", "string"), ("judge_against", "string"),
                ("judge_key", "string"))
JUDGE_COLUMNS = [n for n, _ in JUDGE_FIELDS]
VERDICT_DDL = ", ".join(f"{k} {'long' if k == 'silver_version' else 'string'}" for k in RECORD_KEYS) + \
    ", judge_verdict string, judge_first string, judge_second string, judge_error string, judge_key string"
#: sha256 of the rubric and question: a changed prompt judges every row again.
RUBRIC_SHA = hashlib.sha256(f"{RUBRIC}\n{QUESTION}".encode("utf-8")).hexdigest()[:16]
#: Why a compared row of a judged side got no verdict.
NOT_JUDGED_EMPTY_REFERENCE = "empty_reference"


@dataclass(frozen=True)
class Judge:
    """The judge of one evaluate run: the model (as infer's :class:`InferSpec`), what the sides
    are judged against, and which sides are judged."""
    spec: InferSpec
    against: str                 # baseline | reference (resolved)
    requested: str               # evaluate.judge_against as configured
    baseline: Side | None        # side A in baseline mode
    judged: tuple                # the labels of the judged sides
    note: str                    # why the mode differs from the request ("" when it does not)

    @property
    def against_label(self) -> str:
        """eval_records.judge_against: the baseline's ``model_sha:params_sha`` or ``reference``."""
        return f"{self.baseline.model_sha}:{self.baseline.params_sha}" if self.baseline else REFERENCE

    def identity(self) -> dict:
        """What decides a verdict besides the two answers (the run's parameters carry it)."""
        return {"judge_sha": self.spec.digest, "params": self.spec.identity(), "rubric_sha": RUBRIC_SHA,
                "against": self.against_label}

    def static_key(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode("utf-8")).hexdigest()


def resolve_judge(e, sides: list[Side]) -> Judge:
    """On the driver: the judge of ``evaluate`` config ``e`` for ``sides`` (see the module
    docstring). Errors name ``evaluate.judge_model``."""
    source = str(e.judge_model or "").strip()
    if not source:
        raise ValueError("evaluate.judge_model is empty: no judge")
    cfg = InferConfig(model=source, max_new_tokens=int(e.judge_max_new_tokens), do_sample=False,
                      device=e.judge_device, dtype=e.judge_dtype, batch_tokens=int(e.judge_batch_tokens),
                      max_batch_size=int(e.judge_max_batch_size), window_rows=int(e.judge_window_rows),
                      engine="torch", compute_type="default")
    try:
        spec = resolve_spec(cfg)
    except Exception as exc:
        raise RuntimeError(f"evaluate.judge_model={source!r}: {exc}") from exc
    try:
        check_dolly_tokenizer(load_tokenizer(tokenizer_dir_for(spec.model_dir), dolly_tokens=False))
    except Exception as exc:
        raise ValueError(f"evaluate.judge_model={source!r} ({spec.model_dir}) cannot judge: {exc}. The judge answers "
                         "through the project's generator in Dolly's prompt format") from exc
    requested = e.judge_against
    if requested not in (BASELINE, REFERENCE):
        raise ValueError(f"evaluate.judge_against: {requested!r} is not one of {BASELINE}, {REFERENCE}")
    if requested == BASELINE and len(sides) > 1:
        return Judge(spec, BASELINE, requested, sides[0], tuple(s.label for s in sides[1:]), "")
    note = ("evaluate.judge_against=baseline needs two sides, and only side A is compared: every side is judged "
            "against silver's reference response instead") if requested == BASELINE else ""
    return Judge(spec, REFERENCE, requested, None, tuple(s.label for s in sides), note)


def _side_is(side: Side):
    return (F.col("model_sha") == side.model_sha) & (F.col("params_sha") == side.params_sha)


def _blank(col):
    return col.isNull() | (F.trim(col) == "")


def judge_rows(rows: DataFrame, tasks: DataFrame, judge: Judge, sides: list[Side]) -> tuple[DataFrame, DataFrame]:
    """(the rows to judge, the rows of judged sides left unjudged with their reason).

    ``rows``: :func:`dollyflow.engine.evaluate.compared_rows`; ``tasks``: silver at the evaluated
    version (record_id, instruction, context). The rows to judge carry :data:`RECORD_KEYS`,
    ``instruction``, ``context``, ``reference`` (None in reference mode, where it is answer 1),
    ``answer_1``, ``answer_2`` and ``judge_key``."""
    judged = [s for s in sides if s.label in judge.judged]
    cond = F.lit(False)
    for s in judged:
        cond = cond | _side_is(s)
    cand = rows.where(cond)
    task = tasks.select("record_id", "instruction", "context").dropDuplicates(["record_id"])
    if judge.against == BASELINE:
        base = rows.where(_side_is(judge.baseline)).select(
            "record_id", F.col("prediction").alias("answer_1"), F.col("prediction_sha").alias("answer_1_sha"))
        cand = cand.join(base, "record_id", "inner").withColumn("with_reference", F.col("reference"))
        skipped = cand.limit(0)
    else:
        cand = (cand.withColumn("answer_1", F.col("reference"))
                .withColumn("answer_1_sha", F.sha2(F.coalesce(F.col("reference"), F.lit("")), 256))
                .withColumn("with_reference", F.lit(None).cast("string")))
        skipped = cand.where(_blank(F.col("reference")))
        cand = cand.where(~_blank(F.col("reference")))
    key = F.sha2(F.concat_ws("\u0001", F.lit(judge.static_key()), F.col("answer_1_sha"), F.col("prediction_sha")), 256)
    out = (cand.join(task, "record_id", "left")
           .select(*RECORD_KEYS, "instruction", "context", F.col("with_reference").alias("reference"), "answer_1",
                   F.col("prediction").alias("answer_2"), key.alias("judge_key")))
    skipped = skipped.select(*RECORD_KEYS, F.lit(NOT_JUDGED_EMPTY_REFERENCE).alias("reason"))
    return out, skipped


def _text(v):
    if v is None or v is pd.NA or (isinstance(v, float) and v != v):
        return None
    return v


def judge_window(gen, pdf: pd.DataFrame) -> pd.DataFrame:
    """Judge one window of :func:`judge_rows` rows with ``gen`` (a Generator): both orders of every
    row in one ``generate`` call; returns :data:`VERDICT_DDL`'s columns."""
    instructions, contexts = [], []
    for r in pdf.itertuples(index=False):
        task = {"instruction": _text(r.instruction), "context": _text(r.context), "response": _text(r.reference)}
        for p in judge_prompts(task, _text(r.answer_1), _text(r.answer_2)):
            instructions.append(p.instruction)
            contexts.append(p.context)
    results = gen.generate(instructions, contexts)
    firsts, seconds, verdicts, errors = [], [], [], []
    for i in range(len(pdf)):
        one, two = results[2 * i], results[2 * i + 1]
        firsts.append(one.response if one.error is None else None)
        seconds.append(two.response if two.error is None else None)
        failed = [f"{name} order: {g.error}" for name, g in (("first", one), ("second", two)) if g.error is not None]
        errors.append("; ".join(failed) or None)
        verdicts.append(UNPARSEABLE if failed else combine(parse_verdict(firsts[-1]), parse_verdict(seconds[-1])))
    out = pdf[RECORD_KEYS].copy()
    out["judge_verdict"] = pd.array(verdicts, dtype=object)
    out["judge_first"] = pd.array(firsts, dtype=object)
    out["judge_second"] = pd.array(seconds, dtype=object)
    out["judge_error"] = pd.array(errors, dtype=object)
    out["judge_key"] = pdf["judge_key"].to_numpy(dtype=object)
    return out


def judge_function(spec: InferSpec, counts=None):
    """The ``mapInPandas`` function judging :func:`judge_rows` rows in windows of
    ``spec.window_rows`` rows (``counts``: an optional
    :func:`dollyflow.engine.infer.load_accumulator`: loads, windows and tasks per Python worker)."""
    window = int(spec.window_rows)

    def note(event: str, n: int = 1) -> None:
        if counts is not None:
            counts.add({(event, os.getpid()): n})

    def judge_frames(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        note("task")
        gen = None
        pending: list[pd.DataFrame] = []
        size = 0

        def flush(pdf: pd.DataFrame) -> pd.DataFrame:
            nonlocal gen
            if gen is None:
                t0 = time.perf_counter()
                gen, loaded = worker_generator(spec)
                if loaded:
                    note("load")
                    note("load_ms", int(round((time.perf_counter() - t0) * 1000)))
            note("window")
            return judge_window(gen, pdf.reset_index(drop=True))

        for pdf in frames:
            if len(pdf) == 0:
                continue
            pending.append(pdf)
            size += len(pdf)
            while size >= window:
                merged = pd.concat(pending, ignore_index=True)
                yield flush(merged.iloc[:window])
                rest = merged.iloc[window:]
                pending, size = ([rest] if len(rest) else []), len(rest)
        if pending:
            yield flush(pd.concat(pending, ignore_index=True))

    return judge_frames


def judge_verdicts(todo: DataFrame, judge: Judge, partitions: int, counts=None) -> DataFrame:
    """The verdicts of ``todo`` (:func:`judge_rows`), judged on the workers over ``partitions``
    tasks, with ``judge_sha`` and ``judge_against``: every :data:`JUDGE_COLUMNS` column."""
    return (todo.repartition(partitions).mapInPandas(judge_function(judge.spec, counts), VERDICT_DDL)
            .withColumn("judge_sha", F.lit(judge.spec.digest))
            .withColumn("judge_against", F.lit(judge.against_label))
            .select(*RECORD_KEYS, *JUDGE_COLUMNS))
