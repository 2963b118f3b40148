"""Inputs for a run on the sample: ``dollyflow quickstart`` (behind ``scripts/run_local.sh``) and
``dollyflow pipeline`` without ``ingest.input``.

The 100 real dolly-15k records and the real pythia tokenizer from ``../shared`` when that folder
is beside the checkout (``DOLLYFLOW_SHARED`` names another); otherwise a generated sample and a
small BPE tokenizer trained on it, so that a fresh clone anywhere still runs end to end.

The quickstart is the tiny preset plus :data:`DEMO`: enough training (10 epochs) that the
randomly initialised tiny model learns Dolly's format, so that its answers end with ``### End``
instead of running to ``max_new_tokens`` (its words still mean nothing: a pythia preset on a GPU
is the real thing), Dolly's own sampled generation, and the untrained base model as the other
side of evaluate's comparison. ``--preset tiny`` alone (tests, laptops) stays the short run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from dollyflow.core.tokens import train_small_tokenizer
from dollyflow.testing.samples import generate_records, write_jsonl

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("DOLLYFLOW_SHARED", REPO.parent / "shared"))
QUICKSTART_INPUTS = Path("warehouse") / "_demo_inputs"


def prepare_inputs(work: Path, tokenizer: bool = True) -> tuple[Path, Path | None]:
    """(sample JSON Lines file, tokenizer directory) for a run on the sample; no tokenizer is
    looked for or trained when ``tokenizer`` is false."""
    sample = SHARED / "data" / "dolly-sample.jsonl"
    work.mkdir(parents=True, exist_ok=True)
    if not sample.is_file():
        sample = write_jsonl(generate_records(200), work / "sample.jsonl")
        print(f"[demo] ../shared not found: generated {sample}", flush=True)
    if not tokenizer:
        return sample, None
    tokenizer = SHARED / "assets" / "gpt-neox-20b"
    if not tokenizer.is_dir():
        tokenizer = work / "tokenizer"
        if not (tokenizer / "tokenizer.json").is_file():
            texts = [v for line in open(sample, encoding="utf-8")
                     for v in json.loads(line).values() if isinstance(v, str)]
            train_small_tokenizer(texts, tokenizer)
            print(f"[demo] ../shared not found: trained a small tokenizer in {tokenizer}", flush=True)
    return sample, tokenizer


def quickstart_args(extra: list[str]) -> list[str]:
    """The ``dollyflow pipeline`` arguments of the quickstart, ``extra`` (overrides, ``--env``,
    ``--preset``) last so that they win."""
    sample, tokenizer = prepare_inputs(QUICKSTART_INPUTS)
    # the tiny preset; 100-200 records: a tenth of them for test (Dolly held out 1000 of 15k)
    return ["--preset", "tiny", f"ingest.input={sample}", f"model.tokenizer={tokenizer}", "tokenize.test_size=0.1",
            "tables.warehouse=warehouse", *DEMO, *extra]


#: What the demo adds to the tiny preset (see the module doc): training long enough that the
#: model learns Dolly's format, Dolly's own sampled generation, and the base model as side A.
DEMO = [
    "train.epochs=10",          # ~110 steps: the loss falls to ~4 and answers end with "### End"
    "train.save_steps=1000",    # no intermediate checkpoint (each costs a second or two)
    "train.eval_steps=50",
    "infer.do_sample=true",     # Dolly's generation (top_p 0.92, top_k 0; seeded per row: reproducible)
    "evaluate.baseline=base",   # infer with the untrained base too; evaluate: base (A) vs fine-tune (B)
    # the model under ./warehouse/models is the demo's own: when the demo's settings change (a newer
    # checkout), the new one is trained beside it and replaces it once complete; an unchanged rerun
    # is still a no-op
    "train.overwrite=true",
]
