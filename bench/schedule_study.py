"""How the compute budget is spent matters as much as how a step is predicted: PSNR vs the full run of the
same seeds for schedules of equal compute on the bundled models (the study behind the budget plan of
tcpade_fx.controller; its table is bench/SCHEDULE_STUDY.md).

    python bench/schedule_study.py [--samples 48] [--models mnist-dit mnist-flux] [--steps 20 28]

Rows: the presets; fixed every-k schedules (warm-up, every k-th step, last step); pure error control (no budget,
a sweep of tolerances); explicit warped masks (``w`` warm-up steps, then computes at ``w − 1 + (N − w)·x^γ``);
the preset "balanced" at other warps. Every row uses Padé [1/1]; seeds 1000.. (not the benchmark's).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tcpade_fx  # noqa: E402
from tcpade_fx import Policy, metrics, models  # noqa: E402


def warped_mask(n: int, budget: float, warm: int, gamma: float) -> str:
    """Explicit schedule: ``warm`` computed steps, then the rest of ceil(budget·n) at warped positions."""
    m = math.ceil(budget * n) - warm
    steps = set(range(warm)) | {round(warm - 1 + (n - warm) * (j / m) ** gamma) for j in range(1, m + 1)}
    return "".join("C" if i in steps else "." for i in range(n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--models", nargs="+", default=["mnist-dit", "mnist-flux"])
    ap.add_argument("--steps", nargs="+", type=int, default=[20, 28])
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = list(range(1000, 1000 + args.samples))
    labels = [s % 10 for s in seeds]
    latents = metrics.seeded_latents(seeds)

    def sample(model, n, policy=None):
        pipe = models.load(model)
        if policy is not None:
            tcpade_fx.compile(pipe, policy=policy)
        images = pipe(labels, latents=latents, num_inference_steps=n, guidance_scale=1.5, output_type="pt").images
        return images, (pipe.tcpade.stats.decisions(0) if policy is not None else None)

    print("| model | N | row | compute | PSNR vs full | schedule |\n|---|---|---|---|---|---|")
    for model, n in itertools.product(args.models, args.steps):
        full, _ = sample(model, n)
        rows = [(name, Policy.preset(name)) for name in ("quality", "balanced", "fast")]
        rows += [(f"fixed every {k}", Policy(schedule="fixed", interval=k)) for k in (2, 3, 4, 5)]
        rows += [(f"error control, tol {t}", Policy(mid_tolerance=t, late_tolerance=t / 2, mid_max_skip=6))
                 for t in (0.1, 0.2, 0.4, 0.8, 1.6)]
        rows += [(f"balanced, warp {g}", Policy.preset("balanced").replace(budget_warp=g)) for g in (1.0, 1.6)]
        budget = 0.4 if n == 20 else 0.43
        rows += [(f"mask w={w} γ={g}", Policy(schedule="explicit", mask=warped_mask(n, budget, w, g)))
                 for w, g in itertools.product((2, 3), (1.0, 1.3, 1.6))]
        for name, policy in rows:
            images, schedule = sample(model, n, policy)
            print(f"| {model} | {n} | {name} | {schedule.count('C') / n:.3f} | {metrics.psnr(full, images):.2f} "
                  f"| `{schedule}` |", flush=True)


if __name__ == "__main__":
    main()
