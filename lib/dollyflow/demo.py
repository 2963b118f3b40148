"""The local end-to-end run behind ``scripts/run_local.sh``: the whole pipeline on local Spark
with the tiny preset.

Inputs: the 100 real dolly-15k records and the real pythia tokenizer from ``../shared`` when
that folder is beside the checkout; otherwise a generated sample and a small BPE tokenizer
trained on it (so a fresh clone anywhere still runs end to end). Extra arguments are passed
through as config overrides (``dedupe.threshold=0.8``) or ``--env``/``--preset``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from dollyflow.pipeline import run_pipeline

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("DOLLYFLOW_SHARED", REPO.parent / "shared"))


def prepare_inputs(work: Path, tokenizer: bool = True) -> tuple[Path, Path | None]:
    """(sample JSON Lines file, tokenizer directory) for the demo; no tokenizer is looked for or
    trained when ``tokenizer`` is false."""
    sample = SHARED / "data" / "dolly-sample.jsonl"
    work.mkdir(parents=True, exist_ok=True)
    if not sample.is_file():
        from dollyflow.core.samples import generate_records, write_jsonl
        sample = write_jsonl(generate_records(200), work / "sample.jsonl")
        print(f"[demo] ../shared not found: generated {sample}", flush=True)
    if not tokenizer:
        return sample, None
    tokenizer = SHARED / "assets" / "gpt-neox-20b"
    if not tokenizer.is_dir():
        tokenizer = work / "tokenizer"
        if not (tokenizer / "tokenizer.json").is_file():
            from dollyflow.core.tokens import train_small_tokenizer
            texts = [v for line in open(sample, encoding="utf-8")
                     for v in json.loads(line).values() if isinstance(v, str)]
            train_small_tokenizer(texts, tokenizer)
            print(f"[demo] ../shared not found: trained a small tokenizer in {tokenizer}", flush=True)
    return sample, tokenizer


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    sample, tokenizer = prepare_inputs(Path("warehouse") / "_demo_inputs")
    # 100-200 records: a tenth of them for test (Dolly held out 1000 of 15k)
    return run_pipeline(["--preset", "tiny", f"ingest.input={sample}", f"model.tokenizer={tokenizer}",
                         "tokenize.test_size=0.1", "tables.warehouse=warehouse", *argv])


if __name__ == "__main__":
    raise SystemExit(main())
