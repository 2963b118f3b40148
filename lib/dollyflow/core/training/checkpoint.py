"""Checkpoint directories: naming, completion, selection, pruning, RNG states (engine-free).

A checkpoint is ``<checkpoint_dir>/step-00000200/``: DeepSpeed's files (weights, optimizer and
scheduler, written by every rank), one ``rng-rank<r>.pt`` per rank (Python, numpy, torch and CUDA
generator states) and, written last by rank 0 after every rank has finished (a barrier), the
marker ``complete.json`` (step, epoch position, world size, fingerprint). Selection only ever
considers directories with a valid marker, so a checkpoint cut short by a crash or a kill is never
picked; such leftovers are removed when the next run starts. Checkpoints need a local path or a
FUSE mount every rank sees (``/Volumes/...`` and ``/dbfs/...`` on Databricks, NFS elsewhere).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dollyflow.core.storage import write_atomic

MARKER = "complete.json"
_TAG = re.compile(r"^step-(\d{8,})$")


def tag(step: int) -> str:
    return f"step-{int(step):08d}"


@dataclass
class Checkpoint:
    step: int
    path: str
    info: dict | None       # the marker's content; None when incomplete

    @property
    def complete(self) -> bool:
        return self.info is not None

    @property
    def tag(self) -> str:
        return os.path.basename(self.path)


def _marker(path: str) -> dict | None:
    try:
        info = json.loads(Path(path, MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and "step" in info else None


def list_checkpoints(root: str) -> list[Checkpoint]:
    """Every ``step-*`` directory under ``root``, by step."""
    out = []
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    for name in names:
        m = _TAG.match(name)
        path = os.path.join(root, name)
        if m and os.path.isdir(path):
            out.append(Checkpoint(int(m.group(1)), path, _marker(path)))
    return sorted(out, key=lambda c: c.step)


def latest_complete(root: str, fingerprint: str | None = None) -> Checkpoint | None:
    """The complete checkpoint with the highest step (of this ``fingerprint`` when given)."""
    for c in reversed(list_checkpoints(root)):
        if c.complete and (fingerprint is None or c.info.get("fingerprint") == fingerprint):
            return c
    return None


def mark_complete(path: str, info: dict) -> None:
    """Write the marker (atomically) once every rank's files are in ``path``."""
    write_atomic(os.path.join(path, MARKER), json.dumps(info, indent=2, sort_keys=True).encode("utf-8"))


def remove_incomplete(root: str) -> list[str]:
    """Remove checkpoints without a marker (left by a crash); returns their tags."""
    gone = []
    for c in list_checkpoints(root):
        if not c.complete:
            shutil.rmtree(c.path, ignore_errors=True)
            gone.append(c.tag)
    return gone


def prune(root: str, keep: int) -> list[str]:
    """Keep the ``keep`` newest complete checkpoints (0: all); returns the tags removed."""
    if keep <= 0:
        return []
    complete = [c for c in list_checkpoints(root) if c.complete]
    gone = []
    for c in complete[:-keep]:
        # the marker goes first, so a half-removed checkpoint is never taken for a complete one
        try:
            os.remove(os.path.join(c.path, MARKER))
        except FileNotFoundError:
            pass
        shutil.rmtree(c.path, ignore_errors=True)
        gone.append(c.tag)
    return gone


def rng_file(path: str, rank: int) -> str:
    return os.path.join(path, f"rng-rank{int(rank)}.pt")


def capture_rng() -> dict:
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_rng(path: str, rank: int) -> None:
    import torch

    os.makedirs(path, exist_ok=True)
    torch.save(capture_rng(), rng_file(path, rank))


def load_rng(path: str, rank: int) -> None:
    import torch

    restore_rng(torch.load(rng_file(path, rank), weights_only=False))
