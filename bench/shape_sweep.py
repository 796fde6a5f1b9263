"""A serving sweep: 12 resolutions x 3 batch sizes through one compiled tiny Flux transformer (2 + 2 blocks),
per-signature capture (``dynamic_shapes=False``, no bound: what tcpade_fx did before) against dynamic-shape graphs
with the LRU bound (the default), in eager and under inductor. Each mode runs in a fresh process (RSS is per
process); 1 thread. Under inductor the per-signature mode runs the first INDUCTOR_BEFORE_SHAPES shapes only (each
is a capture and two compiles, 25-40 s on this machine); the table says how many shapes each row ran.

    python bench/shape_sweep.py            # -> bench/SHAPE_SWEEP.md
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


INDUCTOR_BEFORE_SHAPES = 6
MODES = {  # name: (dynamic shapes, backend, shapes run (None: all))
    "static": (False, "eager", None),
    "dynamic": (True, "eager", None),
    "inductor-static": (False, "inductor", INDUCTOR_BEFORE_SHAPES),
    "inductor-dynamic": (True, "inductor", None),
}


def sweep(dynamic: bool, backend: str = "eager", limit: int | None = None) -> dict:
    import torch

    import tcpade_fx
    from tcpade_fx.testing import tiny_flux

    torch.set_num_threads(1)
    module, _ = tiny_flux(batch=2)
    tcpade_fx.compile(module, "full", backend=backend, dynamic_shapes=dynamic,
                      max_graph_sets=4 if dynamic else 10**6)
    runtime = module.tcpade
    shapes = [(batch, side * side) for side in range(3, 15) for batch in (2, 3, 4)][:limit]
    rss0, first_call_s, reuse_s, second_call_s = _rss_mb(), [], [], []
    for i, (batch, tokens) in enumerate(shapes):
        _, kwargs = tiny_flux(batch=batch, image_tokens=tokens, seed=i)
        for k in range(2):  # two steps per shape: the second runs the (compiled) compute graph
            kwargs["timestep"] = torch.full((batch,), 1.0 - (2 * i + k) / (2 * len(shapes)))
            captures = runtime.stats.captures
            t0 = time.perf_counter()
            with torch.no_grad():
                module(**kwargs)
            elapsed = time.perf_counter() - t0
            if k == 1:
                second_call_s.append(elapsed)
            else:
                (first_call_s if runtime.stats.captures > captures else reuse_s).append(elapsed)
    return {"dynamic": dynamic, "backend": backend, "shapes": len(shapes), "captures": runtime.stats.captures,
            "compiles": sum(runtime.stats.compiles.values()),
            "graph_sets": runtime.graph_sets, "rss_growth_mb": _rss_mb() - rss0,
            "capture_call_s": sum(first_call_s) / max(len(first_call_s), 1),
            "new_shape_call_s": sum(reuse_s) / max(len(reuse_s), 1),
            "second_call_s": sum(second_call_s) / len(second_call_s),
            "total_s": sum(first_call_s) + sum(reuse_s) + sum(second_call_s)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in MODES:
        print(json.dumps(sweep(*MODES[sys.argv[1]])))
        return
    rows = [json.loads(subprocess.run([sys.executable, __file__, mode], capture_output=True, text=True,
                                      check=True).stdout.strip().splitlines()[-1]) for mode in MODES]
    lines = ["# A sweep of 12 resolutions x 3 batch sizes", "", "`python bench/shape_sweep.py`: tiny Flux (2 + 2 blocks), "
             "image tokens 9..196, batch 2/3/4, two steps per shape, \"full\" policy, 1 thread, one fresh process per mode.", "",
             "| backend | mode | shapes run | captures | compiles (both graphs) | graph sets held | RSS growth | mean call "
             "with a capture | mean first call of a reused shape (verified: 2 forwards) | mean second call at a shape "
             "(inductor: with its compile, if any) | total |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    def reused(r):
        return f"{r['new_shape_call_s'] * 1e3:.0f} ms" if r["captures"] < r["shapes"] else "— (none reused)"

    for r in rows:
        mode = "dynamic shapes, LRU 4 (now)" if r["dynamic"] else "one capture per signature, unbounded (before)"
        compiles = r["compiles"] if r["backend"] != "eager" else "—"
        lines.append(f"| {r['backend']} | {mode} | {r['shapes']} | {r['captures']} | {compiles} | {r['graph_sets']} | "
                     f"{r['rss_growth_mb']:.0f} MB | {r['capture_call_s']:.2f} s | {reused(r)} | "
                     f"{r['second_call_s'] * 1e3:.0f} ms | {r['total_s']:.1f} s |")
    lines += ["", "Under inductor, a dynamic-shape capture compiles each graph once with its symbolic axes marked "
              "dynamic (tcpade_fx/backends/inductor.py); a per-signature capture compiles per shape. Under \"full\" "
              "the predict graph runs only in each new shape's verification, so the 2 compiles of the dynamic row are "
              "one compute and one predict graph."]
    text = "\n".join(lines)
    print(text)
    Path(__file__).with_name("SHAPE_SWEEP.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
