"""Does fitting the denominator's modulation μ (Policy.modulate_denominator) pay, and what do lower budgets cost?

    python bench/modulation_study.py [--samples 48] [--models mnist-dit mnist-flux] [--steps 20 28 50]
        [--budgets 0.40 0.35 0.25]

For each model, step count and budget: the "balanced" plan at that budget (``fast``'s stage settings at budgets
below 0.3) predicted with plain Padé [1/1] (μ = 1), with the fitted μ, and with Taylor-1 on the very schedule the
fitted run took; and, at the same number of block-stack evaluations, simply running fewer steps with Euler and
with UniPC. PSNR against the full run of the same seeds (1000.., not the benchmark's). The table is
bench/MODULATION_STUDY.md.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tcpade_fx  # noqa: E402
from benchmark import euler, unipc  # noqa: E402
from tcpade_fx import Policy, metrics, models  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--models", nargs="+", default=["mnist-dit", "mnist-flux"])
    ap.add_argument("--steps", nargs="+", type=int, default=[20, 28, 50])
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.40, 0.35, 0.25])
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = list(range(1000, 1000 + args.samples))
    labels = [s % 10 for s in seeds]
    latents = metrics.seeded_latents(seeds)

    def sample(model, n, policy=None, scheduler=None):
        pipe = models.load(model)
        if scheduler is not None:
            pipe.scheduler = scheduler
        if policy is not None:
            tcpade_fx.compile(pipe, policy=policy)
        images = pipe(labels, latents=latents, num_inference_steps=n, guidance_scale=1.5, output_type="pt").images
        return images, (pipe.tcpade.stats if policy is not None else None)

    print("| model | N | budget | compute | Padé μ=1 | Padé, fitted μ | Taylor-1, same schedule | fewer steps Euler "
          "| fewer steps UniPC | median μ | schedule |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model, n in itertools.product(args.models, args.steps):
        full, _ = sample(model, n)
        for budget in args.budgets:
            base = Policy.preset("balanced" if budget >= 0.3 else "fast").replace(compute_budget=budget)
            fitted, stats = sample(model, n, base)
            plain, _ = sample(model, n, base.replace(modulate_denominator=False))
            schedule = stats.decisions(0)
            taylor, _ = sample(model, n, Policy(method="taylor", schedule="explicit", mask=schedule))
            mus = [m for r in stats.records if (m := r.modulation) is not None]
            mu = sorted(mus)[len(mus) // 2] if mus else float("nan")
            c = schedule.count("C")
            fewer = [metrics.psnr(full, sample(model, c, scheduler=s())[0]) for s in (euler, unipc)]
            print(f"| {model} | {n} | {budget:.2f} | {c / n:.3f} | {metrics.psnr(full, plain):.2f} "
                  f"| {metrics.psnr(full, fitted):.2f} | {metrics.psnr(full, taylor):.2f} | {fewer[0]:.2f} "
                  f"| {fewer[1]:.2f} | {mu:.2f} | `{schedule}` |", flush=True)


if __name__ == "__main__":
    main()
