"""Numerics of ``backend_options={"regional": True}`` against the flat inductor compile: the compute graph of a
narrow Flux (3 dual + 6 single blocks, ``compile_depth.narrow_flux``) compiled both ways in one process, outputs
compared at two timesteps (relative Frobenius error), and both against the uncompiled graph. Results:
bench/results/regional_numerics.txt

    TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 OMP_NUM_THREADS=1 python bench/regional_numerics.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from compile_depth import narrow_flux

from tcpade_fx.backends.inductor import compile_inductor
from tcpade_fx.passes.pipeline import build_graphs


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())


def main() -> None:
    torch.set_num_threads(1)
    model, kwargs = narrow_flux(3, 6)
    g = build_graphs(model, kwargs)
    counts: dict[str, int] = {}

    def on_compile(name: str) -> None:
        counts[name] = counts.get(name, 0) + 1

    with torch.no_grad():
        ref = g.compute(*g.leaves)
        start = time.perf_counter()
        flat = compile_inductor(g.compute, "compute", on_compile)
        a = flat(*g.leaves)
        t_flat = time.perf_counter() - start
        start = time.perf_counter()
        reg = compile_inductor(g.compute, "compute", on_compile, regional=True)
        b = reg(*g.leaves)
        t_reg = time.perf_counter() - start
        leaves2 = list(g.leaves)
        leaves2[g.timestep_position] = torch.full((1,), 0.5)  # another step: the same compiled code
        a2, b2, ref2 = flat(*leaves2), reg(*leaves2), g.compute(*leaves2)
    print(f"compiles {counts} flat {t_flat:.1f}s regional {t_reg:.1f}s (first call incl. compile, 3+6 blocks)")
    for name, (x, y, z) in {"t=1": (a, b, ref), "t=0.5": (a2, b2, ref2)}.items():
        print(name, "regional vs flat", [rel(p, q) for p, q in zip(y, x)],
              "regional vs graph eager", [rel(p, q) for p, q in zip(y, z)],
              "flat vs eager", [rel(p, q) for p, q in zip(x, z)])


if __name__ == "__main__":
    main()
