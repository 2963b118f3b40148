"""Checkpoint directories: naming, completion, checksums, selection, pruning, RNG states (engine-free).

A checkpoint is ``<checkpoint_dir>/step-00000200/``:

- ``.dollyflow-checkpoint.json``, written by rank 0 *before* anything else goes in: the directory
  was made by dollyflow (run id, fingerprint), so a checkpoint cut short may be removed whole;
- DeepSpeed's files (weights, optimizer and scheduler, written by every rank);
- per rank, its RNG states without any pickle: ``rng-rank<r>.json`` (Python's and numpy's
  generators) and ``rng-rank<r>.safetensors`` (torch's CPU and CUDA generator states);
- written last by rank 0, once every rank's files are in (a barrier), the marker
  ``complete.json``: step, epoch position, world size, fingerprint and the **sha256 and size of
  every file** of the checkpoint. The ranks hash the files in parallel.

Selection only considers directories with a valid marker, so a checkpoint cut short by a crash
is never picked. Before a resume every listed file is checked against the marker (sizes on the
driver, sha256 on the ranks, in parallel): a truncated, tampered or unlisted file refuses the
checkpoint by name. DeepSpeed's own state files are still loaded by DeepSpeed (``torch.load``
with pickles): the checksums make sure they are the files this project wrote, and a checkpoint
directory must be writable only by the training identity.

Removal touches only what the project wrote: a complete checkpoint's listed files and its
markers (a directory left with anything else is kept, and named); an incomplete one only when
its start marker says dollyflow made it.
"""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dollyflow.core.storage import check_within, remove_dir, write_atomic
from dollyflow.core.tokens import file_sha256

MARKER = "complete.json"
#: Recovery scripts DeepSpeed copies into a checkpoint root whenever it saves there
DEEPSPEED_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")
STARTED = ".dollyflow-checkpoint.json"
MARKER_FORMAT = 2            # complete.json with "files" (sha256 and size of every file)
_TAG = re.compile(r"^step-(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that must not be loaded: a file is missing, truncated, changed or unlisted."""


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

    @property
    def ours(self) -> bool:
        """Made by dollyflow: a complete marker, or the start marker."""
        return self.complete or os.path.isfile(os.path.join(self.path, STARTED))


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


def mark_started(path: str, info: dict) -> None:
    """Rank 0, before a checkpoint's files are written: the directory is dollyflow's."""
    os.makedirs(path, exist_ok=True)
    write_atomic(os.path.join(path, STARTED), json.dumps(info, sort_keys=True).encode("utf-8"))


def checkpoint_files(path: str) -> list[str]:
    """The files of a checkpoint directory (relative, sorted), the markers excluded."""
    out = []
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), path)
            if rel in (MARKER, STARTED) or (f.startswith(".") and ".tmp-" in f):   # markers, write_atomic's temp files
                continue
            out.append(rel)
    return sorted(out)


def hash_files(path: str, names: list[str], rank: int = 0, world: int = 1) -> dict[str, dict]:
    """{name: {"sha256", "bytes"}} of this rank's share (every ``world``-th name) of ``names``."""
    return {n: {"sha256": file_sha256(os.path.join(path, n)), "bytes": os.path.getsize(os.path.join(path, n))}
            for n in names[rank::world]}


def mark_complete(path: str, info: dict, files: dict[str, dict]) -> None:
    """Write the marker (atomically) once every rank's files are in ``path``, with the sha256
    and size of each of them (``files``: from :func:`hash_files` of every rank)."""
    doc = dict(info, format=MARKER_FORMAT, files={k: files[k] for k in sorted(files)})
    write_atomic(os.path.join(path, MARKER), json.dumps(doc, indent=2, sort_keys=True).encode("utf-8"))


def quick_check(c: Checkpoint) -> list[str]:
    """What is wrong with checkpoint ``c`` that sizes alone tell (cheap, on the driver): no
    checksums (an older format), a listed file missing or of another size, an unlisted file."""
    files = (c.info or {}).get("files")
    if not isinstance(files, dict) or not files:
        return [f"{c.tag}/{MARKER} lists no file checksums (written by an older dollyflow): it cannot be "
                "verified, so it is not loaded"]
    problems = []
    present = set(checkpoint_files(c.path))
    for name, meta in files.items():
        full = os.path.join(c.path, name)
        if name not in present:
            problems.append(f"{c.tag}/{name}: missing")
        elif os.path.getsize(full) != int(meta.get("bytes", -1)):
            problems.append(f"{c.tag}/{name}: {os.path.getsize(full)} bytes, {meta.get('bytes')} when it was "
                            "written (truncated or changed)")
    for name in sorted(present - set(files)):
        problems.append(f"{c.tag}/{name}: not a file of this checkpoint (unlisted in {MARKER})")
    return problems


def verify_share(c: Checkpoint, rank: int = 0, world: int = 1) -> list[str]:
    """This rank's share of the full check: sizes and listing (:func:`quick_check`, on rank 0)
    and the sha256 of every ``world``-th listed file."""
    problems = quick_check(c) if rank == 0 else []
    files = (c.info or {}).get("files") or {}
    names = sorted(files)
    for name in names[rank::world]:
        full = os.path.join(c.path, name)
        if not os.path.isfile(full):
            continue    # reported by quick_check
        if file_sha256(full) != files[name].get("sha256"):
            problems.append(f"{c.tag}/{name}: sha256 differs from {MARKER} (tampered or corrupted)")
    return problems


def refusal(c: Checkpoint, problems: list[str]) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {c.path} is refused: " + "; ".join(problems[:10])
        + ". Remove that checkpoint directory to resume from an earlier one (or train into another "
          "train.output_dir); a checkpoint directory must be writable only by the training identity")


def _remove_listed(c: Checkpoint, root: str) -> str | None:
    """Remove what dollyflow wrote in checkpoint ``c``; returns its tag when it is gone, None when
    something not ours is left in it (then it is kept, marker removed first so it is never
    taken for a complete checkpoint)."""
    if c.complete and isinstance(c.info.get("files"), dict):
        # the marker goes first, so a half-removed checkpoint is never taken for a complete one
        for name in (MARKER, *sorted(c.info["files"]), STARTED):
            path = os.path.join(c.path, name)
            try:
                check_within(path, c.path, "a file the checkpoint's marker lists")   # a listed "../x" is refused
                os.remove(path)
            except FileNotFoundError:
                pass
        for dirpath, dirs, files in sorted(os.walk(c.path, topdown=False), key=lambda t: -len(t[0])):
            if not os.listdir(dirpath):
                os.rmdir(dirpath)
        return None if os.path.exists(c.path) else c.tag
    if os.path.isfile(os.path.join(c.path, STARTED)) or c.complete:
        # made by dollyflow (start marker, or a complete marker of the format without a file
        # list): the directory and everything DeepSpeed wrote in it are ours
        try:
            os.remove(os.path.join(c.path, MARKER))
        except FileNotFoundError:
            pass
        remove_dir(c.path, under=root)
        return c.tag
    return None


def remove_incomplete(root: str) -> list[str]:
    """Remove checkpoints dollyflow started but never completed (a crash); returns their tags.
    A ``step-*`` directory without dollyflow's start marker is left alone."""
    gone = []
    for c in list_checkpoints(root):
        if not c.complete and os.path.isfile(os.path.join(c.path, STARTED)):
            remove_dir(c.path, under=root)
            gone.append(c.tag)
    return gone


def prune(root: str, keep: int, fingerprint: str | None = None) -> list[str]:
    """Keep the ``keep`` newest complete checkpoints (0: all) of ``fingerprint`` (None: of any);
    returns the tags removed. Checkpoints of other fingerprints are left alone."""
    if keep <= 0:
        return []
    complete = [c for c in list_checkpoints(root)
                if c.complete and (fingerprint is None or c.info.get("fingerprint") == fingerprint)]
    gone = []
    for c in complete[:-keep]:
        t = _remove_listed(c, root)
        if t:
            gone.append(t)
    return gone


def remove_other_runs(root: str, fingerprint: str) -> tuple[list[str], list[str]]:
    """After a model of ``fingerprint`` replaced another: remove the complete checkpoints of
    other fingerprints and dollyflow's incomplete ones (and DeepSpeed's recovery scripts once no
    checkpoint is left beside them). Returns (removed tags, kept paths: a directory in which
    something not written by dollyflow remains)."""
    gone, kept = [], []
    for c in list_checkpoints(root):
        if c.complete and c.info.get("fingerprint") == fingerprint:
            continue
        if not c.ours:
            continue
        t = _remove_listed(c, root)
        (gone.append(t) if t else kept.append(c.path))
    try:
        left = os.listdir(root)
    except FileNotFoundError:
        return gone, kept
    if left and set(left) <= set(DEEPSPEED_SCRIPTS):
        for name in left:
            os.remove(os.path.join(root, name))
    return gone, kept


# ---------------------------------------------------------------------------------------------
# RNG states, without pickles


def rng_files(path: str, rank: int) -> tuple[str, str]:
    """(JSON file, safetensors file) of rank ``rank``'s RNG states in checkpoint ``path``."""
    return (os.path.join(path, f"rng-rank{int(rank)}.json"),
            os.path.join(path, f"rng-rank{int(rank)}.safetensors"))


def rng_file(path: str, rank: int) -> str:
    """The file whose presence says rank ``rank`` saved its RNG states in ``path``."""
    return rng_files(path, rank)[0]


def capture_rng() -> tuple[dict, dict]:
    """(JSON-able Python and numpy states, {name: uint8 tensor} torch and CUDA states)."""
    import torch

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": {"version": version, "state": list(internal), "gauss_next": gauss},
             "numpy": {"name": name, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)}}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    return plain, tensors


def restore_rng(plain: dict, tensors: dict) -> None:
    import torch

    p = plain["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    n = plain["numpy"]
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])


def save_rng(path: str, rank: int) -> None:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    plain, tensors = capture_rng()
    js, st = rng_files(path, rank)
    write_atomic(js, json.dumps(plain).encode("utf-8"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, st)


def load_rng(path: str, rank: int) -> None:
    """Restore rank ``rank``'s RNG states: JSON and safetensors, nothing unpickled."""
    from safetensors.torch import load_file

    js, st = rng_files(path, rank)
    with open(js, encoding="utf-8") as f:
        plain = json.load(f)
    restore_rng(plain, load_file(st))
