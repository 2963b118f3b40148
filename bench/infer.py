#!/usr/bin/env python
"""Generation throughput: dollyflow's batched core and the infer job against Dolly-style
generation, in the same run, on the same model and prompts, greedy, same max_new_tokens.

    .venv/bin/python bench/infer.py --workdir /tmp/infer-bench            # CPU (+ the Spark job)
    .venv/bin/python bench/infer.py --gpu --workdir /tmp/infer-bench-gpu  # CUDA, no Spark needed

Prompts: the 100 real dolly-15k sample records (``../shared``; a generated sample without it),
each used three times so that 300 prompts are all different: as is (instruction + context), with
the context dropped (instruction only), and with "Answer briefly: " before the instruction (with
its context). Each side renders them with Dolly's generation prompt. More than 300 (``--prompts``,
for overhead runs at larger job sizes, with ``--no-baseline``): the 300 again, numbered.

CPU mode (default):

- model: a tiny GPT-NeoX with a realistic-for-CPU shape (hidden 256, 4 layers, 8 heads, the real
  50k-token pythia vocabulary, 2048 positions: 29M parameters, most of them the embeddings),
  trained for 400 AdamW steps of 4 records on 32 sample records whose responses span the
  sample's lengths (:func:`dollyflow.testing.fixtures.tiny_dolly_model`), so that it answers and
  emits ``### End`` after responses of different lengths, as a fine-tuned Dolly does. Built once
  into ``<workdir>/model``. max_new_tokens 128 (Dolly's 256 would double the baseline's time).
- **baseline, Dolly-style**: what ``InstructionTextGenerationPipeline`` does per call -- tokenize
  one prompt, ``model.generate(input_ids, attention_mask, pad_token_id=eos,
  eos_token_id=<### End id>, max_new_tokens, do_sample=False)``, find the ``### Response:`` token
  and ``### End`` in the sequence and decode between them -- one prompt per call, in order.
- **core**: :class:`dollyflow.core.generation.generator.Generator` over the same prompts, in windows of
  ``window_rows`` (as the UDF does), one process using every core (torch's default threads).
- **job**: ``dollyflow.jobs.infer.run`` on local Spark (``local[<cores>]``: one task and one
  Python worker per core, one torch thread each) over the same prompts from a temp view, mode
  overwrite, into a Delta table: its tokens/s over the generation action (model loads in the
  workers, Spark and the UDF included) against the core's = the UDF overhead ratio; then the
  same job again in the same session (``warm``: the workers are reused and already hold the
  model, as in the steady state of a long job) = the warm ratio.
- **core, cold**: the core in a fresh Python process, timed around the whole process (start,
  imports, model and tokenizer load, generation): the cold job against it = what Spark and the
  UDF add to a cold start (``udf_overhead_ratio_cold_vs_cold``); the issue's ratio compares the
  cold job with the core's generation alone, model already loaded.

- **CTranslate2, plain** (unless ``--no-ct2``): the peer a user would pick for fast CPU batch
  generation, a plain script: the model converted to float32 (not timed), one ``generate_batch``
  over the same prompts with the settings that reproduce the core's greedy outputs
  (``beam_size=1, sampling_topk=1``, stop at ``### End``/eos, ``max_batch_size=2048`` tokens),
  the better of ``cores`` replicas x 1 thread and 1 x ``cores`` threads.
- **job, engine=ctranslate2**: the infer job with ``infer.engine=ctranslate2
  infer.compute_type=float32`` (cold: conversion, workers and loads included in its
  ``first_predictions_seconds``; then warm), against the plain script
  (``job_ct2_warm_vs_ct2_plain``, the issue's goal: >= 1.0); and the same with
  ``infer.compute_type=int8`` (``job_ct2_int8_*``: int8 weights, answers not all equal).

- **core, generic path**: the same core with ``fast=False``: every decode step through the model's
  own ``forward`` and cache, the path every architecture but GPT-NeoX runs (``generic_vs_fast``).
- **same size, another architecture** (``--generic-arch``, default llama; ``none`` skips): a
  model of that architecture with the bench model's shape, trained the same way, the core
  (generic path) against the Dolly-style baseline on it (``same_size``).

Reported: generated tokens/s of each side (``### End`` counted as generated on both sides),
speedup = core / baseline, overhead = job / core, p50/p95 seconds per row (baseline: one call;
core: from the row's prefill, when it joins the running batch, to its last token), and how many
responses are equal between baseline and core.

GPU mode (``--gpu``): a pythia-410m-shaped GPT-NeoX with random weights (24 layers, hidden 1024,
16 heads, vocabulary 50304) in bf16 on CUDA; the core against transformers ``generate`` with
static batching (fixed batches of ``--batch-size`` prompts in input order, left padded, each
batch running until all its rows stop or reach max_new_tokens). Random weights almost never emit
``### End``, so every row runs to max_new_tokens on both sides: this measures the loop, not the
early exits of a fine-tuned model.

Figures measured on 2 CPU cores: bench/README.md. Prints one JSON object, also written to
``<workdir>/result.json``. Run it alone (it uses every
core): ``flock /tmp/dollyflow-heavy.lock python bench/infer.py``.
"""
from __future__ import annotations

import os
import sys

# bench/ holds tokenize.py, which would shadow the standard library's tokenize module: take this
# directory off the import path before anything imports it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))
SHARED = Path(os.environ.get("DOLLYFLOW_SHARED", REPO.parent / "shared")).resolve()


def records() -> list[dict]:
    sample = SHARED / "data" / "dolly-sample.jsonl"
    if sample.is_file():
        return [json.loads(line) for line in open(sample, encoding="utf-8")]
    from dollyflow.testing.samples import generate_records
    return generate_records(100)


def tokenizer_path(workdir: Path) -> Path:
    real = SHARED / "assets" / "gpt-neox-20b"
    if real.is_dir():
        return real
    from dollyflow.core.tokens import train_small_tokenizer
    out = workdir / "tokenizer"
    if not (out / "tokenizer.json").is_file():
        train_small_tokenizer([v for r in records() for v in (r["instruction"], r["context"], r["response"])], out)
    return out


def prompts(n: int) -> list[tuple[str, str]]:
    """(instruction, context) x n: the sample as is, without context, and with a prefix."""
    recs = records()
    variants = [lambda r: (r["instruction"], r["context"] or ""),
                lambda r: (r["instruction"], ""),
                lambda r: ("Answer briefly: " + r["instruction"], r["context"] or "")]
    out = [v(r) for v in variants for r in recs]
    # beyond 3 x the sample (overhead runs at larger job sizes): the same prompts again, numbered
    # so that every prompt stays different
    i = 1
    while len(out) < n:
        out += [(f"({i}) {a}", b) for a, b in out[:3 * len(recs)]]
        i += 1
    return out[:n]


def training_records(n: int) -> list[dict]:
    """``n`` sample records with short contexts whose responses span the sample's lengths (so the
    trained model answers at different lengths, as a fine-tuned Dolly does)."""
    pool = sorted((r for r in records() if len(r["context"] or "") < 600 and len(r["response"]) < 1500),
                  key=lambda r: len(r["response"]))
    if len(pool) <= n:
        return pool
    return [pool[round(i * (len(pool) - 1) / (n - 1))] for i in range(n)]


def percentiles(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=100, method="inclusive")
    return {"p50": round(q[49], 4), "p95": round(q[94], 4)}


def dolly_style(model, tok, rows, max_new_tokens: int) -> dict:
    """One prompt per call, as Dolly's InstructionTextGenerationPipeline does."""
    import torch

    from dollyflow.core.prompt import END_KEY, RESPONSE_KEY_NL, format_inference_prompt

    end_id = tok.convert_tokens_to_ids(END_KEY)
    response_id = tok.convert_tokens_to_ids(RESPONSE_KEY_NL)
    device = next(model.parameters()).device
    responses, seconds, tokens = [], [], 0
    t0 = time.perf_counter()
    for ins, ctx in rows:
        t = time.perf_counter()
        enc = tok(format_inference_prompt(ins, ctx), return_tensors="pt").to(device)
        with torch.inference_mode():
            seq = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                 pad_token_id=tok.pad_token_id, eos_token_id=end_id, do_sample=False,
                                 max_new_tokens=max_new_tokens)[0].tolist()
        tokens += len(seq) - enc["input_ids"].shape[1]
        start = seq.index(response_id) + 1
        end = seq.index(end_id) if end_id in seq[start:] else None
        text = tok.decode(seq[start:end]).strip()
        if not text:   # Dolly's regex fallback
            m = re.search(r"#+\s*Response:\s*(.+?)#+\s*End", tok.decode(seq), flags=re.DOTALL)
            text = m.group(1).strip() if m else ""
        responses.append(text)
        seconds.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "per_row_s": percentiles(seconds), "responses": responses}


def core(model, tok, rows, max_new_tokens: int, window: int, batch_tokens: int, max_batch_size: int,
         fast: bool = True) -> dict:
    from dollyflow.core.generation.generator import Generator
    from dollyflow.core.generation.params import GenerationParams

    g = Generator(model, tok, GenerationParams(max_new_tokens=max_new_tokens), batch_tokens=batch_tokens,
                  max_batch_size=max_batch_size, fast=fast)
    out = []
    t0 = time.perf_counter()
    for i in range(0, len(rows), window):
        part = rows[i:i + window]
        out += g.generate([r[0] for r in part], [r[1] for r in part])
    wall = time.perf_counter() - t0
    tokens = sum(o.completion_tokens or 0 for o in out)
    return {"tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "per_row_s": percentiles([o.seconds for o in out]), "prefills": g.prefills,
            "finish_reasons": {k: sum(o.finish_reason == k for o in out) for k in ("stop", "length", "error")},
            "responses": [o.response for o in out]}


def core_cold(model_dir: Path, n_prompts: int, max_new_tokens: int, window: int, batch_tokens: int,
              max_batch_size: int) -> dict:
    """The core as a fresh Python process pays for it: start, imports (torch, transformers), the
    model and tokenizer load and the generation, timed from the parent around the whole
    process. Against the cold job it isolates what Spark and the UDF add to a cold start."""
    import subprocess

    cmd = [sys.executable, os.path.abspath(__file__), "--cold-core-child", str(model_dir), "--prompts", str(n_prompts),
           "--max-new-tokens", str(max_new_tokens), "--window", str(window), "--batch-tokens", str(batch_tokens),
           "--batch-size", str(max_batch_size)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"the cold core process failed ({done.returncode}): {done.stderr[-2000:]}")
    child = json.loads(done.stdout.strip().splitlines()[-1])
    return {"tokens": child["tokens"], "seconds": round(wall, 3), "tokens_per_s": round(child["tokens"] / wall, 2),
            "load_seconds": child["load_seconds"], "generate_seconds": child["seconds"]}


def _cold_core_child(args) -> int:
    t0 = time.perf_counter()
    from dollyflow.core.models.loading import load_for_generation

    model, tok = load_for_generation(args.cold_core_child)
    load = time.perf_counter() - t0
    out = core(model, tok, prompts(args.prompts), args.max_new_tokens, args.window, args.batch_tokens,
               args.batch_size)
    print(json.dumps({"tokens": out["tokens"], "seconds": out["seconds"], "load_seconds": round(load, 3)}))
    return 0


def static_batches(model, tok, rows, max_new_tokens: int, batch_size: int) -> dict:
    """transformers generate, fixed batches in input order, left padding."""
    import torch

    from dollyflow.core.prompt import END_KEY, format_inference_prompt

    end_id = tok.convert_tokens_to_ids(END_KEY)
    tok.padding_side = "left"
    device = next(model.parameters()).device
    tokens = 0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(0, len(rows), batch_size):
        enc = tok([format_inference_prompt(a, b) for a, b in rows[i:i + batch_size]], return_tensors="pt",
                  padding=True).to(device)
        with torch.inference_mode():
            seq = model.generate(**enc, pad_token_id=tok.pad_token_id, eos_token_id=[end_id, tok.eos_token_id],
                                 do_sample=False, max_new_tokens=max_new_tokens)
        new = seq[:, enc["input_ids"].shape[1]:]
        for row in new.tolist():   # count each row up to and including its stop token
            stop = next((j for j, t in enumerate(row) if t in (end_id, tok.eos_token_id)), None)
            tokens += len(row) if stop is None else stop + 1
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 2)}


def spark_job(workdir: Path, model_dir: Path, rows, max_new_tokens: int, window: int, batch_tokens: int,
              max_batch_size: int, cores: int, extra: tuple[str, ...] = ()) -> dict:
    from dollyflow.config import SparkConfig, load_config
    from dollyflow.engine.session import get_session
    from dollyflow.jobs import infer

    spark = get_session(SparkConfig(master=f"local[{cores}]", shuffle_partitions=cores, driver_memory="4g"))
    try:
        spark.createDataFrame([(i, a, b) for i, (a, b) in enumerate(rows)], "id int, instruction string, context string") \
            .createOrReplaceTempView("bench_prompts")
        cfg = load_config("infer", [f"tables.warehouse={workdir / 'warehouse'}", f"infer.model={model_dir}",
                                    "infer.query=SELECT id, instruction, context FROM bench_prompts",
                                    "infer.key_columns=[id]", "infer.mode=overwrite",
                                    f"infer.max_new_tokens={max_new_tokens}", f"infer.window_rows={window}",
                                    f"infer.batch_tokens={batch_tokens}", f"infer.max_batch_size={max_batch_size}",
                                    f"infer.partitions={cores}", *extra])
        summary = infer.run(cfg, spark)
        from dollyflow.engine.delta import DeltaStore
        table = {r["id"]: r["response"] for r in DeltaStore(spark, cfg.tables).read("predictions").collect()}
        # the same job again in the same session: the Python workers are reused and hold the
        # model, so this is the steady state of a long job (no worker start, imports, model load)
        warm = infer.run(cfg, spark)
    finally:
        spark.stop()
    return {"tokens": summary["completion_tokens"], "seconds": summary["generation_seconds"],
            "tokens_per_s": summary["tokens_per_second"], "job_seconds": summary["job_seconds"],
            "workers": summary["workers"], "responses": [table[i] for i in range(len(rows))],
            "first_predictions_seconds": summary["job_seconds"], "engine": summary.get("engine"),
            "warm": {"tokens": warm["completion_tokens"], "seconds": warm["generation_seconds"],
                     "tokens_per_s": warm["tokens_per_second"], "workers": warm["workers"]}}


def ct2_plain(model_dir: Path, rows, max_new_tokens: int, cores: int) -> dict:
    """The peer: a plain CTranslate2 script -- the model converted once (not timed; the
    project's converter, as CTranslate2's own fails on transformers 5 GPT-NeoX), the prompts
    tokenized, one ``generate_batch`` over all of them (greedy, stop at ``### End``/eos), with
    the best of its thread layouts on this machine (``cores`` replicas x 1 thread, and 1 x
    ``cores`` threads), float32."""
    import ctranslate2

    from dollyflow.core.generation.ct2 import converted_dir
    from dollyflow.core.models.files import model_digest
    from dollyflow.core.prompt import END_KEY, format_inference_prompt
    from dollyflow.core.tokens import load_tokenizer

    tok = load_tokenizer(str(model_dir), dolly_tokens=False)
    out = converted_dir(str(model_dir), model_digest(str(model_dir)), "float32", str(model_dir.parent / "ct2-cache"))
    tokens = [tok.convert_ids_to_tokens(tok(format_inference_prompt(a, b))["input_ids"]) for a, b in rows]
    end = [tok.convert_tokens_to_ids(END_KEY), tok.eos_token_id]
    best = None
    for inter, intra in ((cores, 1), (1, cores)):
        gen = ctranslate2.Generator(str(out), device="cpu", compute_type="float32", inter_threads=inter,
                                    intra_threads=intra)
        gen.generate_batch(tokens[:8], max_batch_size=2048, batch_type="tokens", beam_size=1, sampling_topk=1,
                           max_length=8, include_prompt_in_result=False, end_token=end)     # warm up
        t0 = time.perf_counter()
        res = gen.generate_batch(tokens, max_batch_size=2048, batch_type="tokens", beam_size=1, sampling_topk=1,
                                 max_length=max_new_tokens, include_prompt_in_result=False, end_token=end,
                                 return_end_token=True)
        seconds = time.perf_counter() - t0
        ids = [r.sequences_ids[0] for r in res]
        n = sum(len(x) for x in ids)
        side = {"inter_threads": inter, "intra_threads": intra, "tokens": n, "seconds": round(seconds, 3),
                "tokens_per_s": round(n / seconds, 1),
                "responses": [tok.decode([t for t in x if t not in end]).strip() for x in ids]}
        del gen
        if best is None or side["tokens_per_s"] > best["tokens_per_s"]:
            best = dict(side, tried=[] if best is None else best["tried"] + [
                {k: best[k] for k in ("inter_threads", "intra_threads", "tokens_per_s")}])
        else:
            best["tried"].append({k: side[k] for k in ("inter_threads", "intra_threads", "tokens_per_s")})
    return best


def cpu(args) -> dict:
    import torch

    from dollyflow.testing.fixtures import tiny_dolly_model
    from dollyflow.core.models.loading import load_for_generation

    workdir = Path(args.workdir)
    model_dir = workdir / "model"
    if not (model_dir / "model.safetensors").is_file():
        t0 = time.perf_counter()
        tiny_dolly_model(model_dir, tokenizer_path(workdir), training_records(args.train_records),
                         steps=args.train_steps, lr=3e-3, hidden_size=256, layers=4, heads=8,
                         max_position_embeddings=2048, batch_size=4)
        print(f"[bench] trained the bench model in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    model, tok = load_for_generation(str(model_dir))
    rows = prompts(args.prompts)
    cores = os.cpu_count() or 1
    result = {"mode": "cpu", "torch_threads": torch.get_num_threads(), "cores": cores, "prompts": len(rows),
              "max_new_tokens": args.max_new_tokens,
              "model": {"dir": str(model_dir), "hidden": 256, "layers": 4, "heads": 8, "vocab": len(tok),
                        "params": sum(p.numel() for p in model.parameters())}}
    base = None if args.no_baseline else dolly_style(model, tok, rows, args.max_new_tokens)
    if base is None:   # the core's first generation in a process is ~7% slower: not on its figure
        core(model, tok, rows[:16], args.max_new_tokens, args.window, args.batch_tokens, args.batch_size)
    ours = core(model, tok, rows, args.max_new_tokens, args.window, args.batch_tokens, args.batch_size)
    result.update(core=ours)
    if base is not None:
        same = sum(a == b for a, b in zip(base["responses"], ours["responses"]))
        result.update(baseline=base, speedup=round(ours["tokens_per_s"] / base["tokens_per_s"], 2),
                      equal_responses=f"{same}/{len(rows)}")
    # the generic decode path (the model's own forward and cache, what every non-GPT-NeoX model runs)
    # on the same model, beside the GPT-NeoX fast path
    generic = core(model, tok, rows, args.max_new_tokens, args.window, args.batch_tokens, args.batch_size, fast=False)
    result.update(core_generic=generic, generic_vs_fast=round(generic["tokens_per_s"] / ours["tokens_per_s"], 3),
                  generic_equal_to_core=f"{sum(a == b for a, b in zip(generic['responses'], ours['responses']))}"
                                        f"/{len(rows)}")
    if base is not None:
        result.update(generic_speedup=round(generic["tokens_per_s"] / base["tokens_per_s"], 2))
    if args.generic_arch != "none":
        result.update(same_size=same_size_arch(args, workdir, rows))
    if not args.no_spark:
        job = spark_job(workdir, model_dir, rows, args.max_new_tokens, args.window, args.batch_tokens,
                        args.batch_size, cores)
        cold = core_cold(model_dir, len(rows), args.max_new_tokens, args.window, args.batch_tokens,
                         args.batch_size)
        result.update(core_cold=cold,
                      udf_overhead_ratio_cold_vs_cold=round(job["tokens_per_s"] / cold["tokens_per_s"], 3))
        result.update(job=job, udf_overhead_ratio=round(job["tokens_per_s"] / ours["tokens_per_s"], 3),
                      udf_overhead_ratio_warm=round(job["warm"]["tokens_per_s"] / ours["tokens_per_s"], 3),
                      job_equal_to_core=f"{sum(a == b for a, b in zip(job['responses'], ours['responses']))}/{len(rows)}")
    if not args.no_ct2:
        plain = ct2_plain(model_dir, rows, args.max_new_tokens, cores)
        result.update(ct2_plain=plain,
                      ct2_plain_equal_to_core=f"{sum(a == b for a, b in zip(plain['responses'], ours['responses']))}"
                                              f"/{len(rows)}")
        if not args.no_spark:
            job2 = spark_job(workdir, model_dir, rows, args.max_new_tokens, args.window, args.batch_tokens,
                             args.batch_size, cores, extra=("infer.engine=ctranslate2", "infer.compute_type=float32",
                                    "infer.partitions=0"))   # its own layout: one task, a replica per core
            result.update(job_ct2=job2,
                          job_ct2_equal_to_core=f"{sum(a == b for a, b in zip(job2['responses'], ours['responses']))}"
                                                f"/{len(rows)}",
                          job_ct2_vs_ct2_plain=round(job2["tokens_per_s"] / plain["tokens_per_s"], 3),
                          job_ct2_warm_vs_ct2_plain=round(job2["warm"]["tokens_per_s"] / plain["tokens_per_s"], 3),
                          job_warm_vs_ct2_plain=round(result["job"]["warm"]["tokens_per_s"] / plain["tokens_per_s"], 3))
            job8 = spark_job(workdir, model_dir, rows, args.max_new_tokens, args.window, args.batch_tokens,
                             args.batch_size, cores, extra=("infer.engine=ctranslate2", "infer.compute_type=int8",
                                                            "infer.partitions=0"))
            result.update(job_ct2_int8=job8,
                          job_ct2_int8_equal_to_core=f"{sum(a == b for a, b in zip(job8['responses'], ours['responses']))}"
                                                     f"/{len(rows)}",
                          job_ct2_int8_warm_vs_ct2_plain=round(job8["warm"]["tokens_per_s"] / plain["tokens_per_s"], 3))
    return result


def same_size_arch(args, workdir: Path, rows) -> dict:
    """A model of ``--generic-arch`` (Llama by default) of the bench model's shape (hidden 256, 4
    layers, 8 heads, the 50k vocabulary), trained the same way: the core (generic path) against the
    Dolly-style baseline on it."""
    from dollyflow.core.models.loading import load_for_generation
    from dollyflow.testing.fixtures import tiny_dolly_model

    model_dir = workdir / f"model-{args.generic_arch}"
    if not (model_dir / "model.safetensors").is_file():
        tiny_dolly_model(model_dir, tokenizer_path(workdir), training_records(args.train_records),
                         steps=args.train_steps, lr=3e-3, hidden_size=256, layers=4, heads=8,
                         max_position_embeddings=2048, batch_size=4, model_type=args.generic_arch)
    model, tok = load_for_generation(str(model_dir))
    out = {"arch": args.generic_arch, "params": sum(p.numel() for p in model.parameters())}
    base = None if args.no_baseline else dolly_style(model, tok, rows, args.max_new_tokens)
    ours = core(model, tok, rows, args.max_new_tokens, args.window, args.batch_tokens, args.batch_size)
    ours.pop("prefills", None)
    out["core"] = ours
    if base is not None:
        out.update(baseline=base, speedup=round(ours["tokens_per_s"] / base["tokens_per_s"], 2),
                   equal_responses=f"{sum(a == b for a, b in zip(base['responses'], ours['responses']))}/{len(rows)}")
    for side in ("baseline", "core"):
        if isinstance(out.get(side), dict):
            out[side].pop("responses", None)
    return out


def gpu(args) -> dict:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from dollyflow.core.tokens import load_tokenizer

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA")
    tok = load_tokenizer(str(tokenizer_path(Path(args.workdir))))
    config = GPTNeoXConfig(vocab_size=50304, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                           intermediate_size=4096, max_position_embeddings=2048, use_parallel_residual=True,
                           tie_word_embeddings=False)   # rotary on 25% of the head dims, theta 10000: pythia's
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config).to("cuda", dtype=torch.bfloat16).eval()
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids("### End"), tok.eos_token_id]
    rows = prompts(args.prompts)
    warm = rows[: min(8, len(rows))]
    static_batches(model, tok, warm, 8, args.batch_size)     # CUDA init, kernels
    base = static_batches(model, tok, rows, args.max_new_tokens, args.batch_size)
    core(model, tok, warm, 8, args.window, args.batch_tokens, args.batch_size)
    torch.cuda.synchronize()
    ours = core(model, tok, rows, args.max_new_tokens, args.window, args.batch_tokens, args.batch_size)
    torch.cuda.synchronize()
    ours.pop("responses")
    return {"mode": "gpu", "device": torch.cuda.get_device_name(0), "dtype": "bfloat16", "prompts": len(rows),
            "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "batch_tokens": args.batch_tokens,
            "model": "pythia-410m shape, random weights", "baseline_static_batching": base, "core": ours,
            "speedup": round(ours["tokens_per_s"] / base["tokens_per_s"], 2),
            "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="/tmp/dollyflow-infer-bench")
    p.add_argument("--prompts", type=int, default=300)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 128 on CPU, 256 (Dolly's) on GPU")
    p.add_argument("--window", type=int, default=256, help="rows sorted together (infer.window_rows)")
    p.add_argument("--batch-tokens", type=int, default=None, help="default: 32768 on CPU, 131072 on GPU")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per batch at most (both sides on GPU); default: 128 on CPU, 64 on GPU")
    p.add_argument("--train-steps", type=int, default=400)
    p.add_argument("--train-records", type=int, default=32)
    p.add_argument("--no-spark", action="store_true", help="CPU: skip the Spark job")
    p.add_argument("--no-ct2", action="store_true", help="CPU: skip the CTranslate2 sides (plain script, "
                   "the job with infer.engine=ctranslate2)")
    p.add_argument("--no-baseline", action="store_true",
                   help="CPU: skip the Dolly-style baseline (overhead runs with many --prompts)")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--generic-arch", default="llama", choices=["llama", "qwen2", "mistral", "none"],
                   help="CPU: also a model of this architecture of the same shape (generic path) against the "
                        "baseline; none: skip")
    p.add_argument("--cold-core-child", default=None, help=argparse.SUPPRESS)   # internal: core_cold()
    args = p.parse_args()
    if args.max_new_tokens is None:
        args.max_new_tokens = 256 if args.gpu else 128
    # CPU: the step's fixed cost (reading the 50k x hidden output embedding, the model's Python
    # modules) is paid per step whatever the rows, so bigger batches amortise it: 128 rows /
    # 32768 tokens measured ~8% more tokens/s than 64 / 16384 on 2 cores (bench/HISTORY.md)
    if args.batch_tokens is None:
        args.batch_tokens = 131072 if args.gpu else 32768
    if args.batch_size is None:
        args.batch_size = 64 if args.gpu else 128
    if args.cold_core_child:
        return _cold_core_child(args)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    result = gpu(args) if args.gpu else cpu(args)
    for side in ("baseline", "core", "job", "core_generic"):
        if isinstance(result.get(side), dict):
            result[side].pop("responses", None)
    text = json.dumps(result, indent=2)
    print(text)
    (Path(args.workdir) / "result.json").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
