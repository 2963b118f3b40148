"""DeepSpeed configuration: presets in ``conf/deepspeed/`` and their ``auto`` values.

Presets mirror Dolly's per-GPU choices (``a100``: bf16 ZeRO-3; ``a10``: bf16 ZeRO-3 with the
optimizer offloaded to CPU; ``v100``: fp16 + the same offload) plus ``cpu`` (fp32 ZeRO-2 over gloo
with torch's AdamW, so nothing is JIT-compiled). ``auto`` picks one from the device the ranks
see. Every ``"auto"`` value is filled from the ``train:`` config here, as Hugging Face's
integration does for Dolly, and precision flags always agree with the resolved precision.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from dollyflow.config import conf_dir

PRESETS = ("a100", "a10", "v100", "cpu")


def device_facts() -> dict:
    """What the current process sees: CUDA or not, bf16 support, GPU memory and name."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is in the train extra
        return {"cuda": False}
    if not torch.cuda.is_available():
        return {"cuda": False}
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"cuda": True, "name": props.name, "capability": list(torch.cuda.get_device_capability()),
            "memory_gib": round(props.total_memory / 2**30, 1), "bf16": bool(torch.cuda.is_bf16_supported()),
            "count": torch.cuda.device_count()}


def auto_preset(facts: dict) -> str:
    """``cpu`` without CUDA; bf16-capable GPUs with >= 40 GiB: ``a100``, smaller ones ``a10``
    (optimizer offload, Dolly's fix for 24 GB cards); GPUs without bf16: ``v100``."""
    if not facts.get("cuda"):
        return "cpu"
    if not facts.get("bf16"):
        return "v100"
    return "a100" if facts.get("memory_gib", 0) >= 40 else "a10"


def load_preset(name: str, conf_root: str | Path | None = None) -> dict:
    """A preset by name (``conf/deepspeed/<name>.json``) or a JSON/YAML file by path."""
    if name in PRESETS:
        if conf_root is None:
            conf_root = conf_dir()
        path = Path(conf_root) / "deepspeed" / f"{name}.json"
    else:
        path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"train.deepspeed: no DeepSpeed config {path} (presets: {', '.join(PRESETS)})")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml
        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a DeepSpeed config must be a mapping")
    return data


def resolve_precision(requested: str, preset: dict, facts: dict) -> str:
    """fp32 without CUDA; else ``requested`` or, for ``auto``, the preset's (bf16 only where the
    GPU has it, fp16 otherwise)."""
    if not facts.get("cuda"):
        if requested in ("bf16", "fp16"):
            raise ValueError(f"train.precision={requested} needs a CUDA GPU; this rank has none (use auto or fp32)")
        return "fp32"
    if requested != "auto":
        if requested == "bf16" and not facts.get("bf16"):
            raise ValueError(f"train.precision=bf16 but {facts.get('name')} has no bf16 (use fp16 or auto)")
        return requested
    if preset.get("bf16", {}).get("enabled") and facts.get("bf16"):
        return "bf16"
    if preset.get("fp16", {}).get("enabled") or preset.get("bf16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def _set_auto(d: dict, key: str, value) -> None:
    if d.get(key, "auto") == "auto":
        d[key] = value


def fill(preset: dict, t, *, world_size: int, total_steps: int, hidden_size: int, precision: str) -> dict:
    """The preset with every ``auto`` filled from the train settings ``t`` (the ``train:``
    section: the spec's :class:`~.spec.TrainSettings` or a :class:`~dollyflow.config.TrainConfig`), the ZeRO stage overridden when ``train.zero_stage`` is set and the
    precision sections set to ``precision``. Raises if an ``auto`` is left."""
    ds = copy.deepcopy(preset)
    ds.pop("_comment", None)
    micro = t.batch_size
    gas = t.grad_accum
    _set_auto(ds, "train_micro_batch_size_per_gpu", micro)
    _set_auto(ds, "gradient_accumulation_steps", gas)
    _set_auto(ds, "train_batch_size", micro * gas * world_size)
    _set_auto(ds, "gradient_clipping", t.gradient_clipping)
    ds["fp16"] = dict(ds.get("fp16") or {}, enabled=precision == "fp16")
    ds["bf16"] = dict(ds.get("bf16") or {}, enabled=precision == "bf16")
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    p = opt.setdefault("params", {})
    _set_auto(p, "lr", t.learning_rate)
    _set_auto(p, "betas", [t.adam_beta1, t.adam_beta2])
    _set_auto(p, "eps", t.adam_eps)
    _set_auto(p, "weight_decay", t.weight_decay)
    sched = ds.get("scheduler")
    if sched is not None and sched.get("type") in ("WarmupLR", "WarmupCosineLR", "auto"):
        warmup = t.warmup_steps
        # DeepSpeed's schedulers need >= 1 warmup step: no warmup = one "warmup" step at the peak
        if t.lr_scheduler == "cosine":
            ds["scheduler"] = {"type": "WarmupCosineLR", "params": {
                "total_num_steps": max(2, int(total_steps)), "warmup_min_ratio": 0.0 if warmup else 1.0,
                "warmup_num_steps": max(1, warmup), "cos_min_ratio": t.min_lr_ratio,
                "warmup_type": t.warmup_type}}
        else:
            sp = dict(sched.get("params") or {})
            if not warmup:
                sp["warmup_min_lr"] = t.learning_rate if sp.get("warmup_min_lr", "auto") == "auto" \
                    else sp["warmup_min_lr"]
                warmup = 1
            _set_auto(sp, "warmup_min_lr", 0.0)
            _set_auto(sp, "warmup_max_lr", t.learning_rate)
            _set_auto(sp, "warmup_num_steps", warmup)
            sp.setdefault("warmup_type", t.warmup_type)
            ds["scheduler"] = {"type": "WarmupLR", "params": sp}
    z = ds.setdefault("zero_optimization", {"stage": 0})
    if t.zero_stage is not None:
        z["stage"] = t.zero_stage
    h2 = int(hidden_size) * int(hidden_size)
    _set_auto(z, "reduce_bucket_size", h2)
    _set_auto(z, "allgather_bucket_size", 5 * 10**8)     # DeepSpeed's default
    _set_auto(z, "stage3_prefetch_bucket_size", int(0.9 * h2))
    _set_auto(z, "stage3_param_persistence_threshold", 10 * int(hidden_size))
    left = [k for k, v in _walk(ds) if v == "auto"]
    if left:
        raise ValueError(f"DeepSpeed config: 'auto' left for {', '.join(left)}: set them in the preset")
    return ds


def _walk(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def zero_stage(ds: dict) -> int:
    return int((ds.get("zero_optimization") or {}).get("stage", 0))
