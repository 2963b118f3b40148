"""How a training run reports: ``[dollyflow train]`` lines from rank 0, and the step progress
(a tqdm bar on a terminal, else a log line every ``log_steps`` steps)."""
from __future__ import annotations

import sys
import time

LOG = "[dollyflow train]"


def say(msg: str, rank: int = 0) -> None:
    if rank == 0:
        print(f"{LOG} {msg}", flush=True)


def fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
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
            say(f"step {step}/{self.total} epoch {entry['epoch']} loss {entry['loss']:.4f} lr {entry['lr']:.3g} "
                f"tokens/s {entry['tokens_per_s']:.0f} useful tokens/s {entry['useful_tokens_per_s']:.0f} "
                f"eta {fmt_eta(eta)}")

    def write(self, msg: str) -> None:
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.write(f"{LOG} {msg}")
        else:
            say(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
