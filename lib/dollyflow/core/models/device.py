"""Where and in which precision a model runs: the device (:func:`pick_device`: a task's GPU or the
CPU), the dtype (:func:`pick_dtype`: bf16 / fp16 / fp32 by the GPU's generation) and releasing
the GPU's cached memory (:func:`release_gpu_memory`)."""
from __future__ import annotations


def pick_device(device: str = "auto", gpu_addresses: list[str] | None = None) -> str:
    """``cuda:<i>`` when CUDA is available (the first of ``gpu_addresses``, Spark's GPU resource
    of the task, when given), else ``cpu``; an explicit ``cpu``/``cuda``/``cuda:<i>`` is kept."""
    import torch

    if device not in ("auto", "", None):
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available")
        return str(device)
    if not torch.cuda.is_available():
        return "cpu"
    if gpu_addresses:
        try:
            index = int(gpu_addresses[0])
        except ValueError:
            index = 0
        if index < torch.cuda.device_count():
            return f"cuda:{index}"
    return "cuda:0" if torch.cuda.device_count() else "cpu"


def pick_dtype(device: str, dtype: str = "auto"):
    """torch dtype: bf16 on GPUs that have it, fp16 on older GPUs (V100), fp32 on CPU; an
    explicit ``float32``/``bfloat16``/``float16`` wins."""
    import torch

    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in ("auto", "", None):
        if dtype not in names:
            raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(names)}")
        return names[dtype]
    if str(device).startswith("cuda"):
        # bf16 needs Ampere or later (compute capability 8); is_bf16_supported() alone also
        # answers True for emulated bf16 on older GPUs, which is slow
        major, _ = torch.cuda.get_device_capability(torch.device(device).index or 0)
        return torch.bfloat16 if major >= 8 and torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def release_gpu_memory() -> None:
    """Collect garbage and give the CUDA allocator's cached blocks back (after a model is dropped
    or a batch failed)."""
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
