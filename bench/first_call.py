"""What the first call of a compiled transformer costs: attention ops on real tensors (model work, counted with
``tcpade_fx.testing.AttentionCounter``) and wall time, both against one plain forward.

    python bench/first_call.py                       # this checkout -> bench/FIRST_CALL.md
    python bench/first_call.py --tree OLD_CHECKOUT   # the same measurement on another checkout's tcpade_fx

The first call captures (torch.export, on fake tensors: no attention on real data), runs the transformer once as
the verification reference and the compute graph once (its outputs serve the call), and the predict graph (no
attention). 1 thread, median of --repeats fresh modules.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def _counter_class():
    spec = importlib.util.spec_from_file_location("_tcpade_testing", HERE / "tcpade_fx" / "testing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.AttentionCounter


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tree", type=Path, default=HERE, help="checkout whose tcpade_fx is measured")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(args.tree))
    import torch

    import tcpade_fx
    from tcpade_fx.testing import TINY_TRANSFORMERS

    torch.set_num_threads(1)
    Counter = _counter_class()
    rows = []
    for family in ("dit", "flux", "wan", "sd3", "pixart"):
        plain_t, first_t, counts = [], [], []
        for _ in range(args.repeats):
            module, kwargs = TINY_TRANSFORMERS[family]()
            with torch.no_grad(), Counter() as plain:
                start = time.perf_counter()
                module(**kwargs)
                plain_t.append(time.perf_counter() - start)
            tcpade_fx.compile(module, "balanced")
            with torch.no_grad(), Counter() as first:
                start = time.perf_counter()
                module(**kwargs)
                first_t.append(time.perf_counter() - start)
            counts.append((plain.calls, first.calls))
        p, f = counts[0]
        rows.append((family, p, f, f / p, statistics.median(first_t) / statistics.median(plain_t)))
    lines = [f"tcpade_fx from {args.tree} (torch {torch.__version__}, 1 thread, median of {args.repeats})", "",
             "| tiny model | attention ops, plain forward | attention ops, first call | forwards' worth | "
             "first call time / plain forward |", "|---|---|---|---|---|"]
    lines += [f"| {f} | {p} | {c} | {r:.2f} | {t:.0f}x |" for f, p, c, r, t in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
