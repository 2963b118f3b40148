"""The training loop: :func:`train_main` runs on every rank, whatever launched it.

One readable recipe (engine-free; DeepSpeed without the Hugging Face Trainer):

1. join the process group; rank 0 verifies the shard directory against its manifest (sha256 of
   every shard, counts, tokenizer) and every rank fails with the same message before step 1 on a
   mismatch;
2. read this rank's slice of the train split and the whole (small) test split;
3. plan every epoch: length-grouped micro-batches per rank, equalised over ranks by splitting
   (:mod:`.batching`), so every rank runs the same number of optimizer steps;
4. build the model (LoRA optional), the DeepSpeed engine from the preset with its ``auto`` values
   filled, and resume from the latest complete checkpoint when there is one;
5. per optimizer step: the global count of label tokens is summed over ranks first, each
   micro-batch's loss is ``sum of its token losses x world / global count``, so the gradient is
   the exact per-token mean over the whole global batch however the tokens fall into rows,
   micro-batches and ranks;
6. evaluate (overall and per category) every ``eval_steps`` and at the end; checkpoint every
   ``save_steps`` (weights, optimizer, scheduler, data position, RNG states), keeping the last K;
7. write the Hugging Face model directory, metrics, model card and provenance (rank 0).

Rank 0's summary is returned on every rank (broadcast), so any launcher may take any rank's value.
"""
from __future__ import annotations

import json
import math
import os
import random
import resource
import sys
import time
from typing import Any

import numpy as np

LOG = "[dollyflow train]"


class ShardCheckError(RuntimeError):
    """The shard directory does not match its manifest."""


class NonFiniteLoss(FloatingPointError):
    """The training or evaluation loss became NaN or infinite: training stops, no model is written."""


def _check_finite(value: float, what: str, step: int, epoch: int | None = None) -> None:
    if not math.isfinite(value):
        where = f"step {step}" + (f" (epoch {epoch})" if epoch is not None else "")
        raise NonFiniteLoss(f"the {what} is {value} at {where}: training stopped and no model was written. "
                            "Lower train.learning_rate or raise train.warmup_steps, check precision "
                            "(train.precision) and the data; a rerun resumes from the last checkpoint before it")


class Hooks:
    """Optional callbacks (subclass and override): ``on_step(step, entry)`` after every optimizer
    step on every rank, ``on_checkpoint(step, path)`` after a checkpoint is complete."""

    def on_step(self, step: int, entry: dict) -> None:
        pass

    def on_checkpoint(self, step: int, path: str) -> None:
        pass


def _say(msg: str, rank: int = 0) -> None:
    if rank == 0:
        print(f"{LOG} {msg}", flush=True)


def _seed_all(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _Progress:
    """A tqdm bar on a terminal (rank 0), else a log line every ``log_steps`` steps."""

    def __init__(self, mode: str, total: int, initial: int, log_steps: int, rank: int):
        self.rank, self.total, self.log_steps = rank, total, log_steps
        self.bar = None
        use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        if rank == 0 and use_bar:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
            except ImportError:
                self.bar = None
        self.t0 = time.time()
        self.start = initial

    def update(self, step: int, entry: dict) -> None:
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.update(1)
            if step % self.log_steps == 0 or step == self.total:
                self.bar.set_postfix(loss=f"{entry['loss']:.4f}", tok_s=f"{entry['tokens_per_s']:.0f}",
                                     epoch=entry["epoch"])
            return
        if step % self.log_steps == 0 or step == self.total:
            done = step - self.start
            eta = (time.time() - self.t0) / max(1, done) * (self.total - step)
            _say(f"step {step}/{self.total} epoch {entry['epoch']} loss {entry['loss']:.4f} lr {entry['lr']:.3g} "
                 f"tokens/s {entry['tokens_per_s']:.0f} useful tokens/s {entry['useful_tokens_per_s']:.0f} "
                 f"eta {_fmt_eta(eta)}")

    def write(self, msg: str) -> None:
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.write(f"{LOG} {msg}")
        else:
            _say(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _model_config(name: str, vocab_size: int, max_length: int):
    if name == "tiny-gpt-neox":
        from dollyflow.core.models.build import tiny_gpt_neox
        return tiny_gpt_neox(vocab_size, max_position_embeddings=max_length).config
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(name, trust_remote_code=False)


def train_main(spec: dict, hooks: Hooks | None = None) -> dict:
    """Train on this rank; returns rank 0's summary on every rank."""
    from dollyflow.core.training import distributed

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ctx = distributed.init(int(spec["train"]["timeout_minutes"]))
    try:
        summary = _train(spec, ctx, hooks or Hooks())
        summary = distributed.broadcast_object(summary if ctx.is_main else None)
    except BaseException:
        if ctx.world == 1:       # in-process runs (tests, notebooks) leave no group behind
            distributed.abort(ctx)
        raise                    # other ranks are stopped by their launcher
    distributed.shutdown(ctx)
    return summary


def _train(spec: dict, ctx, hooks: Hooks) -> dict:  # noqa: C901 - one recipe, top to bottom
    import deepspeed
    import torch

    from dollyflow.config import redact, redact_uri
    from dollyflow.core import shards as shard_io
    from dollyflow.core.prompt import DOLLY_SPECIAL_TOKENS
    from dollyflow.core.storage import join, write_atomic
    from dollyflow.core.tokens import load_tokenizer
    from dollyflow.core.training import batching, checkpoint, dsconfig, modeling, output, tracking
    from dollyflow.core.training.data import local_dir, split_records
    from dollyflow.core.training.distributed import all_gather_object, all_reduce, broadcast_object

    t: dict[str, Any] = spec["train"]
    rank, world, device = ctx.rank, ctx.world, ctx.device
    shard_dir, out_dir, ckpt_root = spec["shard_dir"], spec["output_dir"], spec["checkpoint_dir"]
    final_dir = spec.get("final_output_dir") or out_dir     # out_dir: a sibling while replacing a model
    fp = spec["fingerprint"]["sha256"]
    _seed_all(int(t["seed"]))
    t_start = time.time()

    # 1. the shards match their manifest, checked before anything trains
    problems = shard_io.verify_shards(shard_dir) if ctx.is_main else None
    problems = broadcast_object(problems)
    if problems:
        raise ShardCheckError(f"shard directory {shard_dir} does not match its manifest: " + "; ".join(problems[:10]))
    manifest = shard_io.read_manifest(shard_dir)

    # 2. data
    tok = load_tokenizer(local_dir(join(shard_dir, shard_io.TOKENIZER_DIR)))
    pad_id = int(tok.pad_token_id)
    train = split_records(shard_dir, "train", rank, world)
    test = split_records(shard_dir, "test", 0, 1) if "test" in manifest["splits"] else None
    if len(train) == 0:
        raise RuntimeError(f"rank {rank} has no training records in {shard_dir}")
    budget = int(t["batch_tokens"])
    longest = int(manifest["max_length"])
    if budget and budget < batching.padded_width(int(train.length.max()), t["pad_to_multiple_of"]):
        raise ValueError(f"train.batch_tokens={budget} is smaller than the longest record "
                         f"({int(train.length.max())} tokens; max_length {longest})")

    # 3. the plan of every epoch, the same number of micro-batches on every rank
    gas, epochs = int(t["grad_accum"]), int(t["epochs"])
    plan_kw = dict(seed=int(t["seed"]), rank=rank, batch_size=int(t["batch_size"]), batch_tokens=budget,
                   pad_to_multiple_of=int(t["pad_to_multiple_of"]), group_size=int(t["group_size"]))
    plans = [batching.train_batches(train.length, epoch=e, **plan_kw) for e in range(epochs)]
    targets = all_reduce([len(p) for p in plans], device, op=torch.distributed.ReduceOp.MAX)
    targets = [batching.steps_target([int(x)], gas) for x in targets.tolist()]
    plans = [batching.equalize(p, n) for p, n in zip(plans, targets)]
    steps_per_epoch = [n // gas for n in targets]
    total_steps = sum(steps_per_epoch)
    if int(t["max_steps"]):
        total_steps = min(total_steps, int(t["max_steps"]))

    def locate(step: int) -> tuple[int, int]:
        for e, n in enumerate(steps_per_epoch):
            if step < n:
                return e, step
            step -= n
        raise IndexError(step)

    # 4. DeepSpeed config, model, engine
    facts = dsconfig.device_facts()
    preset_name = t["deepspeed"] if t["deepspeed"] != "auto" else dsconfig.auto_preset(facts)
    presets = spec["deepspeed_presets"]
    preset = presets.get(preset_name) or dsconfig.load_preset(preset_name)
    precision = dsconfig.resolve_precision(t["precision"], preset, facts)
    mcfg = _model_config(spec["model"]["name"], len(tok), int(spec["model"]["max_length"]))
    ds = dsconfig.fill(preset, t, world_size=world, total_steps=total_steps, hidden_size=int(mcfg.hidden_size),
                       precision=precision)
    stage = dsconfig.zero_stage(ds)
    _say(f"{world} rank(s) on {device.type} ({facts.get('name', 'CPU')}), DeepSpeed preset {preset_name}, "
         f"ZeRO-{stage}, {precision}; {len(train)} train records on rank 0, {total_steps} steps "
         f"({'/'.join(map(str, steps_per_epoch))} per epoch)", rank)
    hf_ds = None
    if stage == 3 and spec["model"]["name"] != "tiny-gpt-neox":
        from transformers.integrations import HfDeepSpeedConfig
        hf_ds = HfDeepSpeedConfig(ds)  # noqa: F841 - kept alive: from_pretrained loads partitioned
    lm = modeling.build_model(spec["model"]["name"], len(tok), max_length=int(spec["model"]["max_length"]),
                              precision=precision, gradient_checkpointing=bool(t["gradient_checkpointing"]))
    if t["method"] == "lora":
        new_ids = [tok.convert_tokens_to_ids(x) for x in DOLLY_SPECIAL_TOKENS]
        lm = modeling.apply_lora(lm, t, new_ids)
    module = modeling.LabelLoss(lm)
    trainable = [p for p in module.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in module.parameters())
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=trainable, config=ds,
                                           dist_init_required=False)

    # 5. resume from the latest complete checkpoint of this fingerprint, once its files are
    #    proven to be the ones written (sha256 of each, hashed by the ranks in parallel)
    global_step, resumed_from = 0, None
    found = None
    if ctx.is_main:
        os.makedirs(ckpt_root, exist_ok=True)
        gone = checkpoint.remove_incomplete(ckpt_root)
        if gone:
            _say(f"removed incomplete checkpoint(s) {', '.join(gone)}")
        c = checkpoint.latest_complete(ckpt_root, fp)
        found = (c.tag, c.info) if c else None
    found = broadcast_object(found)
    if found:
        tag, info = found
        if int(info.get("world_size", world)) != world:
            raise RuntimeError(f"checkpoint {tag} was written by {info.get('world_size')} ranks, this run has "
                               f"{world}: resume with train.processes={info.get('world_size')}")
        path = os.path.join(ckpt_root, tag)
        mine = os.path.isfile(checkpoint.rng_file(path, rank))
        if all_reduce([1.0 if mine else 0.0], device, op=torch.distributed.ReduceOp.MIN).item() < 1:
            raise RuntimeError(f"checkpoint {path} lacks some ranks' files: train.checkpoint_dir must be a path "
                               "every rank sees (a shared mount such as /Volumes, /dbfs or NFS)")
        ck = checkpoint.Checkpoint(int(info["step"]), path, info)
        bad = [p for ps in all_gather_object(checkpoint.verify_share(ck, rank, world)) for p in ps]
        if bad:
            raise checkpoint.refusal(ck, bad)
        load_path, _ = engine.load_checkpoint(ckpt_root, tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
        checkpoint.load_rng(path, rank)
        global_step = resumed_from = int(info["step"])
        _say(f"resumed from {path} (step {global_step})", rank)

    # metrics so far: a resumed run keeps the entries up to its checkpoint
    metrics_path = os.path.join(out_dir, output.METRICS)
    entries: list[dict] = []
    foreign: set[str] = set()     # files a user keeps in the directory: never listed as ours
    if ctx.is_main:
        os.makedirs(out_dir, exist_ok=True)
        entries = [e for e in output.read_metrics(metrics_path) if resumed_from and e.get("step", 0) <= resumed_from]
        foreign = set(output.list_files(out_dir, ("checkpoints", output.RUNS_DIR))) - {
            output.METRICS, output.RUN_FILE}

    def flush_metrics() -> None:
        if ctx.is_main:
            write_atomic(metrics_path, "".join(json.dumps(e) + "\n" for e in entries).encode("utf-8"))

    mlf = spec.get("mlflow") or {}
    logger = tracking.MetricLogger(mlf.get("uri"), mlf.get("run_id")) if ctx.is_main else tracking.MetricLogger(None, None)

    def batch_to_device(b: dict) -> dict:
        return {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in b.items()}

    # 6. evaluation
    eval_bs = int(t["eval_batch_size"] or t["batch_size"])
    eval_plan = batching.eval_batches(test.length, eval_bs, budget, int(t["pad_to_multiple_of"])) if test else []
    categories = sorted(set(test.category)) if test else []

    def evaluate(step: int) -> dict | None:
        if not eval_plan:
            return None
        engine.eval()
        acc = np.zeros((len(categories), 3))      # loss sum, label tokens, records
        mine = eval_plan[rank::world]
        rounds = -(-len(eval_plan) // world)
        with torch.no_grad():
            for r in range(rounds):
                idx = mine[r] if r < len(mine) else eval_plan[0][:1]  # a spare forward keeps ZeRO-3 in step
                row_sum, row_cnt = engine(**batch_to_device(test.batch(idx, pad_id, t["pad_to_multiple_of"])))
                if r >= len(mine):
                    continue
                rs, rc = row_sum.double().cpu().numpy(), row_cnt.cpu().numpy()
                for j, i in enumerate(idx):
                    c = categories.index(test.category[int(i)])
                    acc[c] += (rs[j], rc[j], 1)
        acc = all_reduce(acc, device).numpy()
        engine.train()
        per_cat = {c: {"loss": float(acc[k, 0] / acc[k, 1]), "tokens": int(acc[k, 1]), "records": int(acc[k, 2])}
                   for k, c in enumerate(categories) if acc[k, 1] > 0}
        eval_loss = float(acc[:, 0].sum() / acc[:, 1].sum())
        _check_finite(eval_loss, "evaluation loss", step)
        e = {"kind": "eval", "step": step, "eval_loss": eval_loss,
             "eval_tokens": int(acc[:, 1].sum()), "eval_records": int(acc[:, 2].sum()),
             "eval_loss_per_category": per_cat}
        return e

    def save_checkpoint(step: int) -> str:
        tag = checkpoint.tag(step)
        path = os.path.join(ckpt_root, tag)
        epoch, in_epoch = locate(step - 1) if step else (0, 0)
        state = {"step": step, "epoch": epoch, "step_in_epoch": in_epoch + 1, "world_size": world,
                 "fingerprint": fp, "run_id": spec["run_id"]}
        if ctx.is_main:       # the directory is ours before any file goes in (a crash leaves it removable)
            checkpoint.mark_started(path, state)
        torch.distributed.barrier()
        engine.save_checkpoint(ckpt_root, tag=tag, client_state=state, save_latest=False)
        checkpoint.save_rng(path, rank)
        torch.distributed.barrier()
        names = broadcast_object(checkpoint.checkpoint_files(path) if ctx.is_main else None)
        hashed = all_gather_object(checkpoint.hash_files(path, names, rank, world))
        if ctx.is_main:
            flush_metrics()
            checkpoint.mark_complete(path, dict(state, saved_at=time.time()),
                                     {k: v for part in hashed for k, v in part.items()})
            pruned = checkpoint.prune(ckpt_root, int(t["keep_checkpoints"]), fp)
            progress.write(f"checkpoint {path}" + (f" (removed {', '.join(pruned)})" if pruned else ""))
        torch.distributed.barrier()
        hooks.on_checkpoint(step, path)
        return path

    # 7. train
    progress = _Progress(t["progress"], total_steps, global_step, int(t["log_steps"]), rank)
    totals = np.zeros(5)             # loss sum, label tokens, real tokens, padded tokens, records (this run)
    train_seconds = 0.0
    first_loss = last_loss = None
    last_eval = None
    eval_steps, save_steps = int(t["eval_steps"]), int(t["save_steps"])
    engine.train()
    side_seconds = 0.0               # evaluation and checkpoints inside the loop
    loop_t0 = time.time()
    for step in range(global_step, total_steps):
        t0 = time.time()
        epoch, i = locate(step)
        micro = plans[epoch][i * gas:(i + 1) * gas]
        n_global = all_reduce([sum(train.label_tokens(b) for b in micro)], device)[0].item()
        scale = world / n_global
        lr = float(engine.get_lr()[0])       # the rate this step uses (the scheduler steps after it)
        stats = torch.zeros(6, dtype=torch.float64)
        for b in micro:
            batch = batch_to_device(train.batch(b, pad_id, t["pad_to_multiple_of"]))
            row_sum, row_cnt = engine(**batch)
            loss_sum = row_sum.sum()
            engine.backward(loss_sum * scale, scale_wrt_gas=False)
            engine.step()
            real = batch["attention_mask"].sum(dim=1).double()
            stats += torch.tensor([loss_sum.item(), float(row_cnt.sum()), float(real.sum()),
                                   float(batch["input_ids"].numel()), float(len(b)), float((real * real).sum())],
                                  dtype=torch.float64)
        stats = all_reduce(stats, device).numpy()
        dt = time.time() - t0
        train_seconds += dt
        totals += stats[:5]
        loss = float(stats[0] / stats[1])
        _check_finite(loss, "training loss", step + 1, epoch + 1)   # the same value on every rank
        first_loss = loss if first_loss is None else first_loss
        last_loss = loss
        done = step + 1
        digest = None
        if ctx.is_main:
            import hashlib
            ids = ",".join(train.record_id[int(j)] for b in micro for j in b)
            digest = hashlib.sha256(ids.encode()).hexdigest()[:16]
        entry = {"kind": "train", "step": done, "epoch": epoch + 1, "loss": loss, "lr": lr,
                 "label_tokens": int(stats[1]), "tokens": int(stats[2]), "padded_tokens": int(stats[3]),
                 "records": int(stats[4]), "sum_len_sq": int(stats[5]), "seconds": dt, "tokens_per_s": stats[2] / dt,
                 "useful_tokens_per_s": stats[1] / dt, "padding_share": 1 - stats[2] / stats[3],
                 "grad_norm": _grad_norm(engine), "data_digest": digest}
        if ctx.is_main:
            entries.append(entry)
            logger.log(done, {k: entry[k] for k in ("loss", "lr", "tokens_per_s", "useful_tokens_per_s",
                                                    "padding_share", "label_tokens") if entry.get(k) is not None})
        progress.update(done, entry)
        hooks.on_step(done, entry)
        if done % eval_steps == 0 and done != total_steps:
            ts = time.time()
            last_eval = evaluate(done)
            side_seconds += time.time() - ts
            if ctx.is_main and last_eval:
                entries.append(last_eval)
                logger.log(done, _eval_metrics(last_eval))
                progress.write(f"eval at step {done}: loss {last_eval['eval_loss']:.4f} " + ", ".join(
                    f"{c} {d['loss']:.3f}" for c, d in last_eval["eval_loss_per_category"].items()))
        if done % int(t["log_steps"]) == 0:
            flush_metrics()
        if done % save_steps == 0 and done != total_steps:
            ts = time.time()
            save_checkpoint(done)
            side_seconds += time.time() - ts
    loop_seconds = time.time() - loop_t0 - side_seconds
    progress.close()

    # final evaluation (always: the model's last state)
    final_eval = evaluate(total_steps)
    if ctx.is_main and final_eval:
        entries.append(final_eval)
        logger.log(total_steps, _eval_metrics(final_eval))
        _say(f"final eval loss {final_eval['eval_loss']:.4f} " + ", ".join(
            f"{c} {d['loss']:.3f}" for c, d in final_eval["eval_loss_per_category"].items()))

    # 8. the model directory
    t_save = time.time()
    if stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if ctx.is_main else None
    peaks = all_gather_object(round(_peak_rss_mb(), 1))
    summary: dict[str, Any] = {}
    if ctx.is_main:
        state = modeling.strip_prefix(state)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        saved = modeling.save_model(out_dir, state, lm, method=t["method"], lora_save=t["lora_save"], dtype=dtype)
        write_atomic(os.path.join(out_dir, "deepspeed_config.json"), json.dumps(ds, indent=2).encode())
        write_atomic(os.path.join(out_dir, "training_config.json"),
                     json.dumps(spec["config"], indent=2, default=str).encode())
        flush_metrics()
        this_run = [e for e in entries if e.get("kind") == "train" and (resumed_from is None or e["step"] > resumed_from)]
        metrics = {
            "steps": total_steps, "steps_this_run": len(this_run), "resumed_from": resumed_from,
            "epochs_done": _epochs_done(total_steps, steps_per_epoch),
            "train_loss": last_loss if last_loss is not None else _last(entries, "train", "loss"),
            "train_loss_first": first_loss,
            "eval_loss": final_eval["eval_loss"] if final_eval else None,
            "eval_loss_per_category": final_eval["eval_loss_per_category"] if final_eval else {},
            "train_tokens": int(totals[2]), "useful_tokens": int(totals[1]), "padded_tokens": int(totals[3]),
            "train_seconds": round(train_seconds, 3), "loop_seconds": round(loop_seconds, 3),
            "tokens_per_s": totals[2] / train_seconds if train_seconds else None,
            "useful_tokens_per_s": totals[1] / train_seconds if train_seconds else None,
            "padding_share": 1 - totals[2] / totals[3] if totals[3] else None,
            "peak_rss_mb": peaks, "parameters": int(n_params), "trainable_parameters": int(n_trainable),
        }
        summary = {
            "output_dir": out_dir, "checkpoint_dir": ckpt_root, "metrics": metrics, "weights": saved["weights"],
            "adapter_dir": saved["adapter_dir"], "deepspeed_preset": preset_name, "zero_stage": stage,
            "precision": precision, "device": facts, "world_size": world,
            "mlflow_live": logger.live, "mlflow_error": logger.error,
        }
        prov = {
            "name": os.path.basename(os.path.normpath(final_dir)), "base_model": spec["model"]["name"],
            "method": t["method"], "weights": saved["weights"], "run_id": spec["run_id"],
            "launcher": spec["launcher"], "processes": world,
            "dataset": {"shard_dir": redact_uri(shard_dir), "manifest_sha256": spec["manifest_sha256"],
                        "source": manifest.get("source", {}), "tokenized_table": manifest.get("tokenized_table"),
                        "train_records": manifest["splits"]["train"]["records"],
                        "train_tokens": manifest["splits"]["train"]["tokens"],
                        "test_records": manifest["splits"].get("test", {}).get("records", 0),
                        "shards": [dict(s, split=name) for name, sp in manifest["splits"].items()
                                   for s in sp["shards"]]},
            "config": redact({"train": t, "model": spec["model"]}), "fingerprint": spec["fingerprint"],
            "metrics": metrics, "eval_loss_per_category": metrics["eval_loss_per_category"],
            "mlflow_run_id": mlf.get("run_id"), "mlflow_tracking_uri": mlf.get("uri"),
            "deepspeed": {"preset": preset_name, "zero_stage": stage, "precision": precision},
        }
        output.finish_model_dir(out_dir, tok, prov, foreign=foreign)   # tokenizer, generation config, card, provenance last
        summary["save_seconds"] = round(time.time() - t_save, 2)
        summary["seconds"] = round(time.time() - t_start, 2)
        _say(f"model written to {out_dir} ({saved['weights']}) in {summary['save_seconds']} s")
    torch.distributed.barrier()
    del engine
    return summary


def _epochs_done(steps: int, per_epoch: list[int]) -> float:
    done = 0.0
    for n in per_epoch:
        if steps >= n:
            done, steps = done + 1, steps - n
        else:
            return round(done + steps / n, 3) if n else done
    return done


def _eval_metrics(e: dict) -> dict:
    m = {"eval_loss": e["eval_loss"]}
    for c, d in e["eval_loss_per_category"].items():
        m[f"eval_loss.{c}"] = d["loss"]
    return m


def _last(entries: list[dict], kind: str, key: str):
    for e in reversed(entries):
        if e.get("kind") == kind and key in e:
            return e[key]
    return None


def _grad_norm(engine) -> float | None:
    try:
        g = engine.get_global_grad_norm()
    except Exception:  # noqa: BLE001 - not every optimizer reports it
        return None
    if g is None:
        return None
    g = float(g.item() if hasattr(g, "item") else g)
    return g if g == g else None
