"""The budget plan on time-shifted schedules: the warp as the policy says (γ = 1.3 whatever the schedule), an even
plan (γ = 1), and the warp flattened by the step lengths (``StepController.warp``) at β = 1 and as shipped; PSNR
vs the full Euler run at the same shift, on the benchmark's seeds.

    python bench/shift_study.py                      # 3 shifts x 4 models x 20/28/50 steps, 16 samples: ~1 h
    python bench/shift_study.py --models mnist-dit-heldout --shifts 2 --steps 20 28

The runs are the benchmark's own (:class:`benchmark.Bench`: its seeds, latents, guidance, cached full runs);
nothing is written to the benchmark's results. Prints one JSON line per run and a markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchmark import Bench  # noqa: E402
from tcpade_fx import Policy, metrics  # noqa: E402

VARIANTS = {
    "warp 1.3 (step lengths ignored)": dict(step_size_weight=0.0),
    "even plan (γ = 1)": dict(budget_warp=1.0, step_size_weight=0.0),
    "β = 1 (warp flattened to the even plan)": dict(step_size_weight=1.0),
    "shipped (β = 0.5)": {},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mnist-dit", "mnist-flux", "mnist-wan", "mnist-dit-heldout"])
    ap.add_argument("--shifts", nargs="+", type=float, default=[1.0, 2.0, 3.0])
    ap.add_argument("--steps", nargs="+", type=int, default=[20, 28, 50])
    ap.add_argument("--preset", default="balanced")
    ap.add_argument("--samples", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    table = []
    for model in args.models:
        for shift in args.shifts:
            bench = Bench(model, args.samples, timing_samples=0, repeats=0, batch=16, shift=shift)
            for n in args.steps:
                full = bench.reference("euler", lambda: bench.pipe(bench.euler()), n)
                cells = []
                for name, change in VARIANTS.items():
                    policy = Policy.preset(args.preset).replace(**change)
                    pipe = bench.pipe(bench.euler(), policy)
                    out = bench.sample(pipe, n)
                    row = {"model": model, "shift": shift, "steps": n, "variant": name,
                           "psnr": round(metrics.psnr(full, out), 2),
                           "compute": round(bench.computed_calls / max(bench.calls, 1), 3),
                           "schedule": bench.schedules[0]}
                    print(json.dumps(row, ensure_ascii=False), flush=True)
                    cells.append(row)
                table.append(cells)
    print(f"\n| model | shift | N | {' | '.join(VARIANTS)} | shipped schedule |")
    print("|---|---|---|" + "---|" * (len(VARIANTS) + 1))
    for cells in table:
        c0 = cells[0]
        psnrs = " | ".join(f"{c['psnr']:.2f}" for c in cells)
        print(f"| {c0['model']} | {c0['shift']:g} | {c0['steps']} | {psnrs} | `{cells[-1]['schedule']}` |")


if __name__ == "__main__":
    main()
