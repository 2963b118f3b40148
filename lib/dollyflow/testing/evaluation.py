"""Input tables of the evaluate job for tests: ``silver`` rows and ``predictions`` rows in the
schemas the dedupe and infer jobs write, with the texts a test plants (no model needed).

``predictions`` rows carry ``model_info`` as infer stores it: the model directory's provenance
(``dollyflow_model.json``) as JSON, here only what a test needs (e.g. ``mlflow_run_id``).
"""
from __future__ import annotations

import json
from datetime import datetime, timezone

from dollyflow.core.records import record_id

SILVER_DDL = ("record_id string, instruction string, context string, response string, category string, "
              "source_file string, source_line long, ingested_at timestamp, run_id string")
PREDICTIONS_DDL = ("record_id string, response string, finish_reason string, prompt_tokens int, "
                   "completion_tokens int, error string, trimmed_context_tokens int, model string, model_sha string, "
                   "params string, params_sha string, model_info string, run_id string, created_at timestamp")


def silver_rows(records: list[dict]) -> list[tuple]:
    """``records`` (instruction, context, response, category) as silver rows, ids as ingest makes them."""
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    return [(record_id(r["instruction"], r.get("context") or "", r["response"], r["category"]), r["instruction"],
             r.get("context") or "", r["response"], r["category"], "sample", n, now, "test")
            for n, r in enumerate(records, 1)]


def prediction_rows(answers: dict[str, str], *, model: str, model_sha: str, params_sha: str,
                    info: dict | None = None, run_id: str = "infer-test", minute: int = 0) -> list[tuple]:
    """One predictions row per ``record_id -> answer`` of one model and parameter set (finish
    reason ``stop``; ``length`` for an answer of 200+ characters, as a rambling model's)."""
    at = datetime(2026, 1, 2, 0, minute, tzinfo=timezone.utc)
    params = json.dumps({"max_new_tokens": 64, "sha": params_sha})
    return [(rid, text, "length" if len(text) >= 200 else "stop", 10, max(1, len(text) // 4), None, 0, model,
             model_sha, params, params_sha, json.dumps(info, sort_keys=True) if info else None, run_id, at)
            for rid, text in answers.items()]


def write_tables(spark, store, tables, silver: list[tuple], predictions: list[tuple]) -> None:
    """Overwrite silver and predictions with these rows (one commit each)."""
    store.write(spark.createDataFrame(silver, SILVER_DDL), tables.silver, mode="overwrite")
    store.write(spark.createDataFrame(predictions, PREDICTIONS_DDL), tables.predictions, mode="overwrite")
