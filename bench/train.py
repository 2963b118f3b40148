#!/usr/bin/env python
"""Training throughput: dollyflow's loop against a Dolly-style Hugging Face Trainer baseline,
measured in the same run on the same data, model, batch size and steps.

    flock /tmp/dollyflow-heavy.lock .venv/bin/python bench/train.py --workdir /tmp/train-bench
    .venv/bin/python bench/train.py --gpu --workdir /tmp/mfu      # MFU on one GPU (no pyspark)

CPU mode (2 processes each, ``torchrun``, DeepSpeed ZeRO-2 over gloo, fp32, torch's AdamW, no
gradient checkpointing on either side):

- data: the real 100-record sample (``../shared``; generated records otherwise), repeated
  ``--repeat`` times, tokenized into a shard directory with Dolly's prompt format (max 512 tokens);
- model: a random pythia-14m-shaped GPT-NeoX (hidden 128, 6 layers, 4 heads, MLP 512, the
  tokenizer's 50,280-row vocabulary), saved once and loaded by both sides from that directory;
- **baseline** (Dolly's setup): ``transformers.Trainer`` with a DeepSpeed config like Dolly's
  (``auto`` values, WarmupLR) at ZeRO-2 on CPU, ``per_device_train_batch_size`` records in
  random order (the Trainer's sampler, seed 42), collated as Dolly's
  ``DataCollatorForCompletionOnlyLM`` does (re-implemented below: ``DataCollatorForLanguageModeling``
  padding to the longest record, ``pad_to_multiple_of=8``, labels -100 on padding and up to
  and including ``### Response:\\n``), the model's own forward and loss;
- **dollyflow**: ``python -m dollyflow.launch.torchrun`` semantics (``run_without_spark``):
  length-grouped batches of the same number of records, pad to a multiple of 8, the LM head only
  at label positions, the raw DeepSpeed loop;
- figure: useful (label-bearing) tokens per second of training-loop wall time (first step to
  last; the baseline from ``on_train_begin`` to ``on_train_end``; evaluation, checkpoints and
  saving excluded on both sides), best of ``--repeats`` alternating runs; also the padding share
  (padding / all tokens fed) and the peak RSS of every process.

GPU mode (``--gpu``): model FLOPs utilisation of a pythia-1.4b-shaped model (random weights) in
bf16 on one GPU, run by the training loop itself (``train_main`` in this process, length-grouped
token-budget batches, label-only head, DeepSpeed with bf16). Synthetic records with Dolly-like
lengths over a 50,280-token vocabulary (token identities do not matter for FLOPs). Model FLOPs
per step = 6 x body parameters x real tokens + 6 x head parameters x label tokens + 6 x layers x
hidden x sum(length^2) (causal attention); padding and recomputation are not counted.
"""
from __future__ import annotations

import os
import sys

# bench/ holds tokenize.py, which would shadow the standard library's tokenize module.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DOLLYFLOW_SHARED", REPO.parent / "shared")).resolve()
sys.path.insert(0, str(REPO / "lib"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHAPE_14M = dict(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, intermediate_size=512)
SHAPE_1_4B = dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, intermediate_size=8192)


# ---------------------------------------------------------------------------------------------
# data and model


def sample_records(repeat: int) -> list[dict]:
    real = SHARED / "data" / "dolly-sample.jsonl"
    if real.is_file():
        recs = [json.loads(line) for line in real.open(encoding="utf-8")]
    else:
        from dollyflow.testing.samples import generate_records
        recs = generate_records(100)
    out = []
    for k in range(repeat):   # distinct copies (record ids differ), so splits and shards see them all
        out += [dict(r, instruction=r["instruction"] + ("" if k == 0 else f" ({k})")) for r in recs]
    return out


def tokenizer_path(workdir: Path) -> str:
    real = SHARED / "assets" / "gpt-neox-20b"
    if real.is_dir():
        return str(real)
    from dollyflow.core.tokens import train_small_tokenizer
    recs = sample_records(1)
    out = workdir / "tokenizer"
    train_small_tokenizer([r["instruction"] + " " + r["context"] + " " + r["response"] for r in recs], out)
    return str(out)


def save_random_model(out: Path, vocab_size: int, shape: dict, max_length: int, dtype=None) -> str:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    if (out / "config.json").is_file():
        return str(out)
    cfg = GPTNeoXConfig(vocab_size=vocab_size, max_position_embeddings=max_length, use_parallel_residual=True,
                        tie_word_embeddings=False, **shape)
    torch.manual_seed(42)
    model = GPTNeoXForCausalLM(cfg)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(str(out))
    return str(out)


# ---------------------------------------------------------------------------------------------
# baseline: Dolly's Trainer + completion-only collator


class DollyCompletionCollator:
    """Dolly's ``DataCollatorForCompletionOnlyLM`` (training/trainer.py): the language-modelling
    collator pads the batch to its longest record (a multiple of 8), labels = input ids with the
    pad (= eos) id set to -100, then everything up to and including the ``### Response:\\n``
    key is set to -100 per row (searched for in the ids, as Dolly does)."""

    def __init__(self, tokenizer, counts: dict):
        from transformers import DataCollatorForLanguageModeling

        self.inner = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False, return_tensors="pt",
                                                     pad_to_multiple_of=8)
        self.key = tokenizer.encode("### Response:\n")
        self.counts = counts

    def __call__(self, examples):
        import numpy as np

        batch = self.inner(examples)
        labels = batch["labels"].clone()
        for i in range(len(examples)):
            start = None
            for idx in np.where(batch["labels"][i].numpy() == self.key[0])[0]:
                if batch["labels"][i, idx:idx + len(self.key)].tolist() == self.key:
                    start = idx
                    break
            if start is None:
                raise RuntimeError("Could not find response key token IDs")
            labels[i, :start + len(self.key)] = -100
        batch["labels"] = labels
        return batch


def baseline_rank(a: dict) -> None:
    """One rank of the baseline (run under torchrun)."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from dollyflow.core.tokens import load_tokenizer
    from dollyflow.core.training.data import split_records

    rank = int(os.environ.get("RANK", "0"))
    tok = load_tokenizer(os.path.join(a["shard_dir"], "tokenizer"))
    rec = split_records(a["shard_dir"], "train")
    dataset = [{"input_ids": rec.ids(i).tolist()} for i in range(len(rec))]
    counts = {"label_tokens": 0, "tokens": 0, "padded_tokens": 0, "steps": 0}
    times = {}

    class CountingTrainer(Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            counts["label_tokens"] += int((inputs["labels"][:, 1:] != -100).sum())
            counts["tokens"] += int(inputs["attention_mask"].sum())
            counts["padded_tokens"] += int(inputs["input_ids"].numel())
            counts["steps"] += 1
            return super().compute_loss(model, inputs, *args, **kwargs)

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            torch.distributed.barrier()
            times["t0"] = time.time()

        def on_train_end(self, args, state, control, **kw):
            times["t1"] = time.time()

    ds_config = {
        "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True,
                              "reduce_bucket_size": "auto"},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                  "weight_decay": "auto", "torch_adam": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                     "warmup_num_steps": "auto"}},
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto", "steps_per_print": 10 ** 9, "wall_clock_breakdown": False,
    }
    args = TrainingArguments(output_dir=a["out"], per_device_train_batch_size=a["batch_size"],
                             max_steps=a["steps"], learning_rate=a["lr"], warmup_steps=a["warmup"],
                             deepspeed=ds_config, save_strategy="no", eval_strategy="no", logging_steps=10,
                             report_to="none", seed=42, remove_unused_columns=False, disable_tqdm=True,
                             gradient_checkpointing=False, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
                             ddp_backend=None if torch.cuda.is_available() else "gloo")
    model = AutoModelForCausalLM.from_pretrained(a["model_dir"])
    trainer = CountingTrainer(model=model, args=args, train_dataset=dataset,
                              data_collator=DollyCompletionCollator(tok, counts), callbacks=[Clock()])
    trainer.train()
    out = dict(counts, rank=rank, seconds=times["t1"] - times["t0"],
               peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    Path(a["out"], f"rank{rank}.json").write_text(json.dumps(out))


def run_baseline(shard_dir: str, model_dir: str, out: Path, a) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec = {"shard_dir": shard_dir, "model_dir": model_dir, "out": str(out), "batch_size": a.batch_size,
            "steps": a.steps, "lr": a.lr, "warmup": a.warmup}
    (out / "args.json").write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "lib"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.processes}",
           str(Path(__file__).resolve()), "--baseline-rank", str(out / "args.json")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(f"baseline failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(a.processes)]
    seconds = max(r["seconds"] for r in ranks)
    label = sum(r["label_tokens"] for r in ranks)
    tokens = sum(r["tokens"] for r in ranks)
    padded = sum(r["padded_tokens"] for r in ranks)
    return {"useful_tokens_per_s": label / seconds, "tokens_per_s": tokens / seconds, "seconds": seconds,
            "useful_tokens": label, "padding_share": 1 - tokens / padded, "steps": ranks[0]["steps"],
            "peak_rss_mb": [r["peak_rss_mb"] for r in ranks]}


# ---------------------------------------------------------------------------------------------
# dollyflow


def run_ours(shard_dir: str, model_dir: str, out: Path, a, extra: list[str] = ()) -> dict:
    from dollyflow.config import load_config
    from dollyflow.jobs.train import run_without_spark

    cfg = load_config("train", [
        f"tables.warehouse={out.parent / 'wh'}", f"model.name={model_dir}", "model.max_length=512",
        f"train.shard_dir={shard_dir}", f"train.output_dir={out}", "train.overwrite=true", "train.mlflow=false",
        f"train.processes={a.processes}", f"train.batch_size={a.batch_size}", f"train.max_steps={a.steps}",
        "train.epochs=100", f"train.learning_rate={a.lr}", f"train.warmup_steps={a.warmup}",
        "train.eval_steps=1000000", "train.save_steps=1000000", "train.gradient_checkpointing=false",
        "train.deepspeed=cpu", "train.progress=log", "train.log_steps=10", *extra], preset="tiny")
    s = run_without_spark(cfg)
    m = read_provenance_metrics(out)
    return {"useful_tokens_per_s": m["useful_tokens"] / m["loop_seconds"],
            "tokens_per_s": m["train_tokens"] / m["loop_seconds"], "seconds": m["loop_seconds"],
            "useful_tokens": m["useful_tokens"], "padding_share": m["padding_share"], "steps": s["steps"],
            "peak_rss_mb": m["peak_rss_mb"]}


def read_provenance_metrics(out: Path) -> dict:
    return json.loads((out / "dollyflow_model.json").read_text())["metrics"]


def cpu_mode(a) -> dict:
    from dollyflow.core.tokens import load_tokenizer
    from dollyflow.core.shards.build import build_shard_dir

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    shard_dir = work / "shards"
    if not (shard_dir / "manifest.json").is_file():
        build_shard_dir(sample_records(a.repeat), tokenizer_path(work), shard_dir, max_length=512, test_size=16,
                        num_shards=2)
    tok = load_tokenizer(shard_dir / "tokenizer")
    model_dir = save_random_model(work / "model-14m", len(tok), SHAPE_14M, 512)
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    results = {"baseline": [], "dollyflow": []}
    for i in range(a.repeats):
        results["baseline"].append(run_baseline(str(shard_dir), model_dir, work / f"baseline-{i}", a))
        results["dollyflow"].append(run_ours(str(shard_dir), model_dir, work / f"ours-{i}", a))
        print(json.dumps({"repeat": i, "baseline": results["baseline"][-1]["useful_tokens_per_s"],
                          "dollyflow": results["dollyflow"][-1]["useful_tokens_per_s"]}), flush=True)
    best = {k: max(v, key=lambda r: r["useful_tokens_per_s"]) for k, v in results.items()}
    return {
        "mode": "cpu", "processes": a.processes, "batch_size": a.batch_size, "steps": a.steps,
        "model": "random pythia-14m shape " + json.dumps(SHAPE_14M), "vocab": len(tok),
        "train_records": manifest["splits"]["train"]["records"], "repeats": a.repeats,
        "baseline": best["baseline"], "dollyflow": best["dollyflow"],
        "ratio_useful_tokens_per_s": best["dollyflow"]["useful_tokens_per_s"] / best["baseline"]["useful_tokens_per_s"],
        "all": results,
    }


# ---------------------------------------------------------------------------------------------
# GPU: model FLOPs utilisation


PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0, "A10": 125.0, "L4": 121.0}


def synthetic_records(n: int, vocab: int, seed: int = 42) -> tuple[list[dict], "object"]:
    """Records of space-separated word tokens ``t0..t{vocab-1}`` with Dolly-like lengths, and a
    word-level tokenizer over them (+ ``<|endoftext|>``)."""
    import numpy as np
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = np.array([f"t{i}" for i in range(vocab)])
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<|endoftext|>", *words.tolist()])},
                                         unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>")
    rng = np.random.default_rng(seed)
    prompt = np.clip(rng.lognormal(4.3, 0.9, n), 8, 1200).astype(int)      # instruction (+ context)
    resp = np.clip(rng.lognormal(4.2, 0.9, n), 4, 700).astype(int)
    recs = [{"instruction": " ".join(rng.choice(words, p)), "context": "", "response": " ".join(rng.choice(words, r)),
             "category": "open_qa"} for p, r in zip(prompt, resp)]
    return recs, tok


def gpu_mode(a) -> dict:
    import torch

    from dollyflow.config import load_config
    from dollyflow.core.shards.build import build_shard_dir
    from dollyflow.core.training.loop import train_main
    from dollyflow.core.training.model_dir import read_metrics
    from dollyflow.core.training.prepare import prepare

    if not torch.cuda.is_available() and not a.allow_cpu:
        raise SystemExit("--gpu needs a CUDA GPU (--allow-cpu runs the same code path on CPU for a check)")
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    shape = SHAPE_1_4B if not a.allow_cpu else SHAPE_14M
    shard_dir = work / "shards"
    if not (shard_dir / "manifest.json").is_file():
        recs, tok = synthetic_records(a.records, 50277 if not a.allow_cpu else 5000)
        tok.save_pretrained(str(work / "synthetic-tokenizer"))
        build_shard_dir(recs, work / "synthetic-tokenizer", shard_dir, max_length=2048, test_size=8, num_shards=1)
    from dollyflow.core.tokens import load_tokenizer
    vocab = len(load_tokenizer(shard_dir / "tokenizer"))
    dtype = torch.bfloat16 if torch.cuda.is_available() else None
    model_dir = save_random_model(work / ("model-1.4b" if not a.allow_cpu else "model-14m"), vocab, shape, 2048, dtype)
    ds = {"bf16": {"enabled": True}, "fp16": {"enabled": False},
          "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                    "weight_decay": "auto", "torch_adam": True}},
          "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                       "warmup_num_steps": "auto"}},
          "zero_optimization": {"stage": a.zero_stage, "contiguous_gradients": True, "overlap_comm": True,
                                "reduce_bucket_size": "auto", "stage3_gather_16bit_weights_on_model_save": True},
          "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
          "train_micro_batch_size_per_gpu": "auto", "steps_per_print": 10 ** 9}
    ds_path = work / "deepspeed-mfu.json"
    ds_path.write_text(json.dumps(ds))
    out = work / "out"
    cfg = load_config("train", [
        f"tables.warehouse={work / 'wh'}", f"model.name={model_dir}", "model.max_length=2048",
        f"model.tokenizer={work / 'synthetic-tokenizer'}",
        f"train.shard_dir={shard_dir}", f"train.output_dir={out}", "train.overwrite=true", "train.mlflow=false",
        "train.processes=1", f"train.batch_tokens={a.batch_tokens}", f"train.max_steps={a.steps}", "train.epochs=100",
        "train.learning_rate=1e-5", "train.warmup_steps=0", "train.eval_steps=1000000", "train.save_steps=1000000",
        f"train.gradient_checkpointing={str(a.checkpointing).lower()}", f"train.deepspeed={ds_path}",
        f"train.precision={'bf16' if torch.cuda.is_available() else 'fp32'}", "train.progress=log",
        "train.log_steps=5"])
    plan = prepare(cfg)
    summary = train_main(plan["spec"])
    entries = [e for e in read_metrics(str(out / "metrics.jsonl")) if e["kind"] == "train"][a.skip:]
    from transformers import AutoConfig
    mc = AutoConfig.from_pretrained(model_dir)
    h, layers, v = mc.hidden_size, mc.num_hidden_layers, mc.vocab_size
    n_head = v * h
    n_total = summary["metrics"]["parameters"]
    n_body = n_total - 2 * n_head                 # minus the input embedding (a lookup) and the head
    flops = sum(6 * n_body * e["tokens"] + 6 * n_head * e["label_tokens"] + 6 * layers * h * e["sum_len_sq"]
                for e in entries)
    seconds = sum(e["seconds"] for e in entries)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = a.peak_tflops or next((p for k, p in PEAK_BF16_TFLOPS.items() if k in name), None)
    achieved = flops / seconds / 1e12
    label = "random pythia-1.4b shape " if not a.allow_cpu else "random pythia-14m shape (CPU code-path check) "
    return {"mode": "gpu", "device": name, "model": label + json.dumps(shape),
            "parameters": n_total, "zero_stage": a.zero_stage, "batch_tokens": a.batch_tokens,
            "gradient_checkpointing": a.checkpointing, "steps_measured": len(entries),
            "tokens_per_s": sum(e["tokens"] for e in entries) / seconds,
            "useful_tokens_per_s": sum(e["label_tokens"] for e in entries) / seconds,
            "padding_share": 1 - sum(e["tokens"] for e in entries) / sum(e["padded_tokens"] for e in entries),
            "model_tflops_per_s": achieved, "peak_bf16_tflops": peak,
            "mfu": achieved / peak if peak else None,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None}


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--baseline-rank":
        baseline_rank(json.loads(Path(sys.argv[2]).read_text()))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="/tmp/dollyflow-train-bench")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeat", type=int, default=6, help="copies of the 100-record sample")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each side; the best is kept")
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--gpu", action="store_true", help="MFU of a pythia-1.4b shape on one GPU")
    p.add_argument("--allow-cpu", action="store_true", help="--gpu on CPU with a small shape (a code-path check)")
    p.add_argument("--records", type=int, default=6000, help="--gpu: synthetic records")
    p.add_argument("--batch-tokens", type=int, default=16384, help="--gpu: token budget per micro-batch")
    p.add_argument("--zero-stage", type=int, default=1, help="--gpu: ZeRO stage on the single GPU")
    p.add_argument("--checkpointing", action="store_true", help="--gpu: gradient checkpointing on")
    p.add_argument("--skip", type=int, default=5, help="--gpu: warm-up steps not measured")
    p.add_argument("--peak-tflops", type=float, default=None, help="--gpu: the GPU's dense bf16 peak")
    a = p.parse_args()
    if a.gpu:
        a.steps = a.steps if a.steps != 30 else 40
        result = gpu_mode(a)
    else:
        result = cpu_mode(a)
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    (Path(a.workdir) / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "all"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
