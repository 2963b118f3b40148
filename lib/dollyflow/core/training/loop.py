"""The training recipe: :func:`train_main` runs :class:`FinetuneRecipe` on every rank, whatever launched it.

One readable recipe (engine-free; DeepSpeed without the Hugging Face Trainer), in named phases
as torchtune writes them:

``setup``
    1. join the process group (:func:`train_main`); rank 0 verifies the shard directory against
       its manifest (sha256 of every shard, counts, tokenizer) and every rank fails with the
       same message before step 1 on a mismatch;
    2. read this rank's slice of the train split and the whole (small) test split;
    3. plan every epoch: length-grouped micro-batches per rank, equalised over ranks by
       splitting (:mod:`.batching`), so every rank runs the same number of optimizer steps;
    4. build the model (LoRA optional), the DeepSpeed engine from the preset with its ``auto``
       values filled, and resume from the latest complete checkpoint when there is one;
``train``
    5. per optimizer step: the global count of label tokens is summed over ranks first, each
       micro-batch's loss is ``sum of its token losses x world / global count``, so the gradient
       is the exact per-token mean over the whole global batch however the tokens fall into
       rows, micro-batches and ranks;
``evaluate`` / ``save_checkpoint``
    6. evaluate (overall and per category) every ``eval_steps`` and at the end; checkpoint every
       ``save_steps`` (weights, optimizer, scheduler, data position, RNG states), keeping the last K;
``save_model``
    7. write the Hugging Face model directory, metrics, model card and provenance (rank 0).

Rank 0's summary is returned on every rank (broadcast), so any launcher may take any rank's value.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import resource
import time
from typing import Any

import numpy as np
import torch

from dollyflow.config import redact, redact_uri
from dollyflow.core import shards as shard_io
from dollyflow.core.models.build import TINY_MODELS, is_tiny, tiny_causal_lm
from dollyflow.core.prompt import DOLLY_SPECIAL_TOKENS
from dollyflow.core.storage import join, write_atomic
from dollyflow.core import prompt_format
from dollyflow.core.training import batching, checkpoint, distributed, dsconfig, model_dir, modeling, tracking
from dollyflow.core.training.data import local_dir, split_records
from dollyflow.core.training.distributed import DistContext, all_gather_object, all_reduce, broadcast_object
from dollyflow.core.training.errors import NonFiniteLoss, shard_check_error
from dollyflow.core.training.progress import Progress, say
from dollyflow.core.training.spec import TrainSpec


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


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _model_config(name: str, vocab_size: int, max_length: int):
    if is_tiny(name):
        return tiny_causal_lm(TINY_MODELS[name], vocab_size, max_position_embeddings=max_length).config
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(name, trust_remote_code=False)


def train_main(spec: TrainSpec, hooks: Hooks | None = None) -> dict:
    """Train on this rank; returns rank 0's summary on every rank."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ctx = distributed.init(spec.train.timeout_minutes)
    try:
        summary = FinetuneRecipe(spec, ctx, hooks or Hooks()).run()
        summary = distributed.broadcast_object(summary if ctx.is_main else None)
    except BaseException:
        if ctx.world == 1:       # in-process runs (tests, notebooks) leave no group behind
            distributed.abort(ctx)
        raise                    # other ranks are stopped by their launcher
    distributed.shutdown(ctx)
    return summary


class FinetuneRecipe:
    """One rank's training run: :meth:`setup`, :meth:`train` (which calls :meth:`evaluate` and
    :meth:`save_checkpoint` on their schedules, and evaluates once more at the end), then
    :meth:`save_model`. The phases share their state as attributes of the recipe."""

    def __init__(self, spec: TrainSpec, ctx: DistContext, hooks: Hooks):
        self.spec, self.ctx, self.hooks = spec, ctx, hooks
        self.t = spec.train
        self.rank, self.world, self.device = ctx.rank, ctx.world, ctx.device
        self.shard_dir, self.out_dir, self.ckpt_root = spec.shard_dir, spec.output_dir, spec.checkpoint_dir
        self.final_dir = spec.final_output_dir or self.out_dir   # out_dir: a sibling while replacing a model
        self.fp = spec.fingerprint.sha256

    def run(self) -> dict:
        self.setup()
        self.train()
        return self.save_model()

    # -- setup ------------------------------------------------------------------------------

    def setup(self) -> None:
        _seed_all(self.t.seed)
        self.t_start = time.time()
        self._verify_shards()
        self._load_data()
        self._plan_epochs()
        self._build_engine()
        self._resume()
        self._open_metrics()
        self._plan_evaluation()

    def _verify_shards(self) -> None:
        """1. the shards match their manifest, checked before anything trains"""
        problems = shard_io.verify_shards(self.shard_dir) if self.ctx.is_main else None
        problems = broadcast_object(problems)
        if problems:
            raise shard_check_error(self.shard_dir, problems)
        self.manifest = shard_io.read_manifest(self.shard_dir)

    def _load_data(self) -> None:
        """2. data"""
        t, rank, world, shard_dir = self.t, self.rank, self.world, self.shard_dir
        self.prompt = prompt_format.recorded(self.manifest)
        self.tok, self.fmt = prompt_format.load_prompt_tokenizer(local_dir(join(shard_dir, shard_io.TOKENIZER_DIR)),
                                                                 self.manifest)
        self.pad_id = int(self.tok.pad_token_id)
        self.train_set = split_records(shard_dir, "train", rank, world)
        self.test_set = split_records(shard_dir, "test", 0, 1) if "test" in self.manifest["splits"] else None
        if len(self.train_set) == 0:
            raise RuntimeError(f"rank {rank} has no training records in {shard_dir}")
        self.budget = t.batch_tokens
        longest = int(self.manifest["max_length"])
        widest = int(self.train_set.length.max())
        if self.budget and self.budget < batching.padded_width(widest, t.pad_to_multiple_of):
            raise ValueError(f"train.batch_tokens={self.budget} is smaller than the longest record "
                             f"({widest} tokens; max_length {longest})")

    def _plan_epochs(self) -> None:
        """3. the plan of every epoch, the same number of micro-batches on every rank"""
        t = self.t
        self.gas, epochs = t.grad_accum, t.epochs
        plan_kw = dict(seed=t.seed, rank=self.rank, batch_size=t.batch_size, batch_tokens=self.budget,
                       pad_to_multiple_of=t.pad_to_multiple_of, group_size=t.group_size)
        plans = [batching.train_batches(self.train_set.length, epoch=e, **plan_kw) for e in range(epochs)]
        targets = all_reduce([len(p) for p in plans], self.device, op=torch.distributed.ReduceOp.MAX)
        targets = [batching.steps_target([int(x)], self.gas) for x in targets.tolist()]
        self.plans = [batching.equalize(p, n) for p, n in zip(plans, targets)]
        self.steps_per_epoch = [n // self.gas for n in targets]
        self.total_steps = sum(self.steps_per_epoch)
        if t.max_steps:
            self.total_steps = min(self.total_steps, t.max_steps)

    def _locate(self, step: int) -> tuple[int, int]:
        for e, n in enumerate(self.steps_per_epoch):
            if step < n:
                return e, step
            step -= n
        raise IndexError(step)

    def _build_engine(self) -> None:
        """4. DeepSpeed config, model, engine"""
        import deepspeed

        spec, t, tok, world = self.spec, self.t, self.tok, self.world
        self.facts = dsconfig.device_facts()
        self.preset_name = t.deepspeed if t.deepspeed != "auto" else dsconfig.auto_preset(self.facts)
        presets = spec.deepspeed_presets
        preset = presets.get(self.preset_name) or dsconfig.load_preset(self.preset_name)
        self.precision = dsconfig.resolve_precision(t.precision, preset, self.facts)
        mcfg = _model_config(spec.model.name, len(tok), spec.model.max_length)
        self.ds = dsconfig.fill(preset, t, world_size=world, total_steps=self.total_steps,
                                hidden_size=int(mcfg.hidden_size), precision=self.precision)
        self.stage = dsconfig.zero_stage(self.ds)
        say(f"{world} rank(s) on {self.device.type} ({self.facts.get('name', 'CPU')}), DeepSpeed preset "
            f"{self.preset_name}, ZeRO-{self.stage}, {self.precision}; {len(self.train_set)} train records on "
            f"rank 0, {self.total_steps} steps ({'/'.join(map(str, self.steps_per_epoch))} per epoch)", self.rank)
        self.hf_ds = None
        if self.stage == 3 and not is_tiny(spec.model.name):
            from transformers.integrations import HfDeepSpeedConfig
            self.hf_ds = HfDeepSpeedConfig(self.ds)   # kept alive: from_pretrained loads partitioned
        lm = modeling.build_model(spec.model.name, len(tok), max_length=spec.model.max_length,
                                  precision=self.precision, gradient_checkpointing=t.gradient_checkpointing)
        if t.method == "lora":
            # Dolly's added tokens start untrained; the chat format adds none
            new_ids = [tok.convert_tokens_to_ids(x) for x in DOLLY_SPECIAL_TOKENS] if self.fmt.name == "dolly" else []
            lm = modeling.apply_lora(lm, t, new_ids)
        self.lm = lm
        module = modeling.LabelLoss(lm)
        trainable = [p for p in module.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in trainable)
        self.n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in module.parameters())
        self.engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=trainable, config=self.ds,
                                                    dist_init_required=False)

    def _resume(self) -> None:
        """5. resume from the latest complete checkpoint of this fingerprint, once its files are
        proven to be the ones written (sha256 of each, hashed by the ranks in parallel)"""
        ctx, rank, world, ckpt_root = self.ctx, self.rank, self.world, self.ckpt_root
        self.global_step, self.resumed_from = 0, None
        found = None
        if ctx.is_main:
            os.makedirs(ckpt_root, exist_ok=True)
            gone = checkpoint.remove_incomplete(ckpt_root)
            if gone:
                say(f"removed incomplete checkpoint(s) {', '.join(gone)}")
            c = checkpoint.latest_complete(ckpt_root, self.fp)
            found = (c.tag, c.info) if c else None
        found = broadcast_object(found)
        if not found:
            return
        tag, info = found
        if int(info.get("world_size", world)) != world:
            raise RuntimeError(f"checkpoint {tag} was written by {info.get('world_size')} ranks, this run has "
                               f"{world}: resume with train.processes={info.get('world_size')}")
        path = os.path.join(ckpt_root, tag)
        mine = os.path.isfile(checkpoint.rng_file(path, rank))
        if all_reduce([1.0 if mine else 0.0], self.device, op=torch.distributed.ReduceOp.MIN).item() < 1:
            raise RuntimeError(f"checkpoint {path} lacks some ranks' files: train.checkpoint_dir must be a path "
                               "every rank sees (a shared mount such as /Volumes, /dbfs or NFS)")
        ck = checkpoint.Checkpoint(int(info["step"]), path, info)
        bad = [p for ps in all_gather_object(checkpoint.verify_share(ck, rank, world)) for p in ps]
        if bad:
            raise checkpoint.refusal(ck, bad)
        load_path, _ = self.engine.load_checkpoint(ckpt_root, tag, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
        checkpoint.load_rng(path, rank)
        self.global_step = self.resumed_from = int(info["step"])
        say(f"resumed from {path} (step {self.global_step})", rank)

    def _open_metrics(self) -> None:
        """metrics so far: a resumed run keeps the entries up to its checkpoint"""
        out_dir = self.out_dir
        self.metrics_path = os.path.join(out_dir, model_dir.METRICS)
        self.entries: list[dict] = []
        self.foreign: set[str] = set()     # files a user keeps in the directory: never listed as ours
        if self.ctx.is_main:
            os.makedirs(out_dir, exist_ok=True)
            self.entries = [e for e in model_dir.read_metrics(self.metrics_path)
                            if self.resumed_from and e.get("step", 0) <= self.resumed_from]
            self.foreign = set(model_dir.list_files(out_dir, ("checkpoints", model_dir.RUNS_DIR))) - {
                model_dir.METRICS, model_dir.RUN_FILE}
        mlf = self.spec.mlflow
        self.logger = (tracking.MetricLogger(mlf.uri if mlf else None, mlf.run_id if mlf else None)
                       if self.ctx.is_main else tracking.MetricLogger(None, None))

    def _flush_metrics(self) -> None:
        if self.ctx.is_main:
            write_atomic(self.metrics_path, "".join(json.dumps(e) + "\n" for e in self.entries).encode("utf-8"))

    def _to_device(self, b: dict) -> dict:
        return {k: torch.from_numpy(v).to(self.device, non_blocking=True) for k, v in b.items()}

    def _plan_evaluation(self) -> None:
        """6. evaluation: the test split's batches, by category"""
        t, test = self.t, self.test_set
        eval_bs = t.eval_batch_size or t.batch_size
        self.eval_plan = batching.eval_batches(test.length, eval_bs, self.budget, t.pad_to_multiple_of) if test else []
        self.categories = sorted(set(test.category)) if test else []

    # -- evaluate ---------------------------------------------------------------------------

    def evaluate(self, step: int) -> dict | None:
        """The evaluation loss, overall and per category, summed over ranks (None without a test split)."""
        eval_plan, engine, test, categories = self.eval_plan, self.engine, self.test_set, self.categories
        rank, world = self.rank, self.world
        if not eval_plan:
            return None
        engine.eval()
        acc = np.zeros((len(categories), 3))      # loss sum, label tokens, records
        mine = eval_plan[rank::world]
        rounds = -(-len(eval_plan) // world)
        with torch.no_grad():
            for r in range(rounds):
                idx = mine[r] if r < len(mine) else eval_plan[0][:1]  # a spare forward keeps ZeRO-3 in step
                row_sum, row_cnt = engine(**self._to_device(test.batch(idx, self.pad_id, self.t.pad_to_multiple_of)))
                if r >= len(mine):
                    continue
                rs, rc = row_sum.double().cpu().numpy(), row_cnt.cpu().numpy()
                for j, i in enumerate(idx):
                    c = categories.index(test.category[int(i)])
                    acc[c] += (rs[j], rc[j], 1)
        acc = all_reduce(acc, self.device).numpy()
        engine.train()
        per_cat = {c: {"loss": float(acc[k, 0] / acc[k, 1]), "tokens": int(acc[k, 1]), "records": int(acc[k, 2])}
                   for k, c in enumerate(categories) if acc[k, 1] > 0}
        eval_loss = float(acc[:, 0].sum() / acc[:, 1].sum())
        _check_finite(eval_loss, "evaluation loss", step)
        e = {"kind": "eval", "step": step, "eval_loss": eval_loss,
             "eval_tokens": int(acc[:, 1].sum()), "eval_records": int(acc[:, 2].sum()),
             "eval_loss_per_category": per_cat}
        return e

    # -- save_checkpoint --------------------------------------------------------------------

    def save_checkpoint(self, step: int) -> str:
        """Weights, optimizer, scheduler, data position and RNG states of every rank, marked
        complete (with every file's sha256) once all are written; older ones pruned."""
        ctx, rank, world, ckpt_root, engine = self.ctx, self.rank, self.world, self.ckpt_root, self.engine
        tag = checkpoint.tag(step)
        path = os.path.join(ckpt_root, tag)
        epoch, in_epoch = self._locate(step - 1) if step else (0, 0)
        state = {"step": step, "epoch": epoch, "step_in_epoch": in_epoch + 1, "world_size": world,
                 "fingerprint": self.fp, "run_id": self.spec.run_id}
        if ctx.is_main:       # the directory is ours before any file goes in (a crash leaves it removable)
            checkpoint.mark_started(path, state)
        torch.distributed.barrier()
        engine.save_checkpoint(ckpt_root, tag=tag, client_state=state, save_latest=False)
        checkpoint.save_rng(path, rank)
        torch.distributed.barrier()
        names = broadcast_object(checkpoint.checkpoint_files(path) if ctx.is_main else None)
        hashed = all_gather_object(checkpoint.hash_files(path, names, rank, world))
        if ctx.is_main:
            self._flush_metrics()
            checkpoint.mark_complete(path, dict(state, saved_at=time.time()),
                                     {k: v for part in hashed for k, v in part.items()})
            pruned = checkpoint.prune(ckpt_root, self.t.keep_checkpoints, self.fp)
            self.progress.write(f"checkpoint {path}" + (f" (removed {', '.join(pruned)})" if pruned else ""))
        torch.distributed.barrier()
        self.hooks.on_checkpoint(step, path)
        return path

    # -- train ------------------------------------------------------------------------------

    def train(self) -> None:
        """7. the optimizer steps from where setup left off, then the final evaluation"""
        t, ctx, engine, train, device = self.t, self.ctx, self.engine, self.train_set, self.device
        world, gas, total_steps, entries = self.world, self.gas, self.total_steps, self.entries
        self.progress = progress = Progress(t.progress, total_steps, self.global_step, t.log_steps, self.rank)
        self.totals = totals = np.zeros(5)   # loss sum, label tokens, real tokens, padded tokens, records (this run)
        self.train_seconds = 0.0
        self.first_loss = self.last_loss = None
        last_eval = None
        eval_steps, save_steps = t.eval_steps, t.save_steps
        engine.train()
        side_seconds = 0.0               # evaluation and checkpoints inside the loop
        loop_t0 = time.time()
        for step in range(self.global_step, total_steps):
            t0 = time.time()
            epoch, i = self._locate(step)
            micro = self.plans[epoch][i * gas:(i + 1) * gas]
            n_global = all_reduce([sum(train.label_tokens(b) for b in micro)], device)[0].item()
            scale = world / n_global
            lr = float(engine.get_lr()[0])       # the rate this step uses (the scheduler steps after it)
            stats = torch.zeros(6, dtype=torch.float64)
            for b in micro:
                batch = self._to_device(train.batch(b, self.pad_id, t.pad_to_multiple_of))
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
            self.train_seconds += dt
            totals += stats[:5]
            loss = float(stats[0] / stats[1])
            _check_finite(loss, "training loss", step + 1, epoch + 1)   # the same value on every rank
            self.first_loss = loss if self.first_loss is None else self.first_loss
            self.last_loss = loss
            done = step + 1
            digest = None
            if ctx.is_main:
                ids = ",".join(train.record_id[int(j)] for b in micro for j in b)
                digest = hashlib.sha256(ids.encode()).hexdigest()[:16]
            entry = {"kind": "train", "step": done, "epoch": epoch + 1, "loss": loss, "lr": lr,
                     "label_tokens": int(stats[1]), "tokens": int(stats[2]), "padded_tokens": int(stats[3]),
                     "records": int(stats[4]), "sum_len_sq": int(stats[5]), "seconds": dt,
                     "tokens_per_s": stats[2] / dt, "useful_tokens_per_s": stats[1] / dt,
                     "padding_share": 1 - stats[2] / stats[3], "grad_norm": _grad_norm(engine), "data_digest": digest}
            if ctx.is_main:
                entries.append(entry)
                self.logger.log(done, {k: entry[k] for k in ("loss", "lr", "tokens_per_s", "useful_tokens_per_s",
                                                             "padding_share", "label_tokens")
                                       if entry.get(k) is not None})
            progress.update(done, entry)
            self.hooks.on_step(done, entry)
            if done % eval_steps == 0 and done != total_steps:
                ts = time.time()
                last_eval = self.evaluate(done)
                side_seconds += time.time() - ts
                if ctx.is_main and last_eval:
                    entries.append(last_eval)
                    self.logger.log(done, _eval_metrics(last_eval))
                    progress.write(f"eval at step {done}: loss {last_eval['eval_loss']:.4f} " + ", ".join(
                        f"{c} {d['loss']:.3f}" for c, d in last_eval["eval_loss_per_category"].items()))
            if done % t.log_steps == 0:
                self._flush_metrics()
            if done % save_steps == 0 and done != total_steps:
                ts = time.time()
                self.save_checkpoint(done)
                side_seconds += time.time() - ts
        self.loop_seconds = time.time() - loop_t0 - side_seconds
        progress.close()

        # final evaluation (always: the model's last state)
        self.final_eval = final_eval = self.evaluate(total_steps)
        if ctx.is_main and final_eval:
            entries.append(final_eval)
            self.logger.log(total_steps, _eval_metrics(final_eval))
            say(f"final eval loss {final_eval['eval_loss']:.4f} " + ", ".join(
                f"{c} {d['loss']:.3f}" for c, d in final_eval["eval_loss_per_category"].items()))

    # -- save_model -------------------------------------------------------------------------

    def save_model(self) -> dict:
        """8. the model directory (rank 0): weights, configs, metrics, then tokenizer, generation
        config, card and provenance; rank 0's summary ({} on the others)."""
        spec, t, ctx, out_dir, entries = self.spec, self.t, self.ctx, self.out_dir, self.entries
        precision, stage, totals, final_eval = self.precision, self.stage, self.totals, self.final_eval
        t_save = time.time()
        if stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.engine.module.state_dict() if ctx.is_main else None
        peaks = all_gather_object(round(_peak_rss_mb(), 1))
        summary: dict[str, Any] = {}
        if ctx.is_main:
            state = modeling.strip_prefix(state)
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
            saved = modeling.save_model(out_dir, state, self.lm, method=t.method, lora_save=t.lora_save, dtype=dtype)
            write_atomic(os.path.join(out_dir, "deepspeed_config.json"), json.dumps(self.ds, indent=2).encode())
            write_atomic(os.path.join(out_dir, "training_config.json"),
                         json.dumps(spec.config, indent=2, default=str).encode())
            self._flush_metrics()
            resumed_from = self.resumed_from
            this_run = [e for e in entries
                        if e.get("kind") == "train" and (resumed_from is None or e["step"] > resumed_from)]
            train_seconds, manifest, mlf = self.train_seconds, self.manifest, spec.mlflow
            metrics = {
                "steps": self.total_steps, "steps_this_run": len(this_run), "resumed_from": resumed_from,
                "epochs_done": _epochs_done(self.total_steps, self.steps_per_epoch),
                "train_loss": self.last_loss if self.last_loss is not None else _last(entries, "train", "loss"),
                "train_loss_first": self.first_loss,
                "eval_loss": final_eval["eval_loss"] if final_eval else None,
                "eval_loss_per_category": final_eval["eval_loss_per_category"] if final_eval else {},
                "train_tokens": int(totals[2]), "useful_tokens": int(totals[1]), "padded_tokens": int(totals[3]),
                "train_seconds": round(train_seconds, 3), "loop_seconds": round(self.loop_seconds, 3),
                "tokens_per_s": totals[2] / train_seconds if train_seconds else None,
                "useful_tokens_per_s": totals[1] / train_seconds if train_seconds else None,
                "padding_share": 1 - totals[2] / totals[3] if totals[3] else None,
                "peak_rss_mb": peaks, "parameters": int(self.n_params), "trainable_parameters": int(self.n_trainable),
            }
            summary = {
                "output_dir": out_dir, "checkpoint_dir": self.ckpt_root, "metrics": metrics,
                "weights": saved["weights"], "adapter_dir": saved["adapter_dir"],
                "deepspeed_preset": self.preset_name, "zero_stage": stage, "precision": precision,
                "device": self.facts, "world_size": self.world,
                "mlflow_live": self.logger.live, "mlflow_error": self.logger.error,
            }
            prov = {
                "name": os.path.basename(os.path.normpath(self.final_dir)), "base_model": spec.model.name,
                "method": t.method, "weights": saved["weights"], "run_id": spec.run_id, "prompt": self.prompt,
                "architecture": modeling.unwrap(self.lm).config.model_type.replace("_", "-"),
                "launcher": spec.launcher, "processes": self.world,
                "dataset": {"shard_dir": redact_uri(self.shard_dir), "manifest_sha256": spec.manifest_sha256,
                            "source": manifest.get("source", {}), "tokenized_table": manifest.get("tokenized_table"),
                            "train_records": manifest["splits"]["train"]["records"],
                            "train_tokens": manifest["splits"]["train"]["tokens"],
                            "test_records": manifest["splits"].get("test", {}).get("records", 0),
                            "shards": [dict(s, split=name) for name, sp in manifest["splits"].items()
                                       for s in sp["shards"]]},
                "config": redact({"train": dataclasses.asdict(t), "model": dataclasses.asdict(spec.model)}),
                "fingerprint": spec.fingerprint.to_dict(),
                "metrics": metrics, "eval_loss_per_category": metrics["eval_loss_per_category"],
                "mlflow_run_id": mlf.run_id if mlf else None, "mlflow_tracking_uri": mlf.uri if mlf else None,
                "deepspeed": {"preset": self.preset_name, "zero_stage": stage, "precision": precision},
            }
            # tokenizer, generation config, card, provenance last
            model_dir.finish_model_dir(out_dir, self.tok, prov, foreign=self.foreign)
            summary["save_seconds"] = round(time.time() - t_save, 2)
            summary["seconds"] = round(time.time() - self.t_start, 2)
            say(f"model written to {out_dir} ({saved['weights']}) in {summary['save_seconds']} s")
        torch.distributed.barrier()
        del self.engine
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
