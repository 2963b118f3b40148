#!/usr/bin/env python
"""The torch core's decode-step output projection (the 50k-vocabulary LM head, most of a CPU decode
step on the bench model) through other CPU paths, against ``F.linear`` as the core calls it, in
the same run: oneDNN's prepacked linear (``torch.utils.mkldnn.to_mkldnn``) and a contiguous
pre-transposed weight (``x @ W^T``). Per batch size: ms per call, the ratio, and whether the
logits are bitwise equal and their argmax (greedy's token) is the same.

    flock /tmp/dollyflow-heavy.lock .venv/bin/python bench/lm_head.py [--vocab 50280 --hidden 256]

The core keeps ``F.linear`` unless a path gives the same logits: greedy output must stay equal
to ``model.generate`` (tested), and a different kernel changes the last bits.
"""
from __future__ import annotations

import os
import sys

# bench/ holds tokenize.py, which would shadow the standard library's tokenize module.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402


def timed(fn, x, calls: int) -> tuple[float, object]:
    fn(x)
    t0 = time.perf_counter()
    for _ in range(calls):
        y = fn(x)
    return (time.perf_counter() - t0) / calls * 1e3, y


def main() -> int:
    import torch
    import torch.nn.functional as F
    from torch.utils import mkldnn

    p = argparse.ArgumentParser()
    p.add_argument("--vocab", type=int, default=50280)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--calls", type=int, default=50)
    a = p.parse_args()
    torch.manual_seed(0)
    linear = torch.nn.Linear(a.hidden, a.vocab, bias=False).requires_grad_(False)
    w = linear.weight
    packed = mkldnn.to_mkldnn(linear)
    wt = w.t().contiguous()
    out = {"threads": torch.get_num_threads(), "vocab": a.vocab, "hidden": a.hidden, "rows": {}}
    with torch.no_grad():
        for rows in (1, 8, 32, 128):
            x = torch.randn(rows, a.hidden)
            base, yb = timed(lambda z: F.linear(z, w), x, a.calls)
            side = {"F.linear_ms": round(base, 3)}
            for name, fn in (("mkldnn_prepacked", packed), ("transposed_contiguous", lambda z: z @ wt)):
                ms, y = timed(fn, x, a.calls)
                side[name] = {"ms": round(ms, 3), "speedup": round(base / ms, 2), "bitwise_equal": bool(torch.equal(yb, y)),
                              "argmax_equal": bool((yb.argmax(-1) == y.argmax(-1)).all()),
                              "max_abs_diff": float((yb - y).abs().max())}
            out["rows"][rows] = side
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
