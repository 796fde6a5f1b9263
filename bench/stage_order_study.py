"""Issue 13 part 4: stages and order (and the budget plan's warp), revisited with data.

    python bench/stage_order_study.py [--samples 16] [--models mnist-dit mnist-flux] [--steps 20 28 50]
                                      [--presets balanced fast] [--out FILE]

Each variant is the preset with one group of fields changed (``dataclasses.replace``), run for real (its own
decisions: a stage boundary moves the budget plan), and scored by PSNR against the full run of the same seeds and
by the compute it spent. Seeds 4000.. (used by no other study, preset or benchmark), guidance 1.5 as the benchmark.
Run it on ``mnist-dit-heldout`` too: that model is not used to choose anything, it checks what was chosen.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import tcpade_fx  # noqa: E402
from benchmark import sample_images as sample  # noqa: E402
from tcpade_fx import Policy, metrics, models  # noqa: E402

SEED0 = 4000

#: name -> fields changed on the preset
VARIANTS: dict[str, dict] = {
    "preset": {},
    "[2/1] mid and late (4 nodes)": dict(order=2, late_order=2, history_size=4),
    "[2/1] mid, [1/1] late (4 nodes)": dict(order=2, late_order=1, history_size=4),
    "[1/1] mid, reuse late": dict(late_order=0),
    "[0/1] everywhere": dict(order=0, late_order=0),
    "paper stages (early < 0.3, late >= 0.8)": dict(early_end=0.3, late_start=0.8),
    "early < 0.05": dict(early_end=0.05),
    "late >= 0.7": dict(late_start=0.7),
    "no modulation (plain Padé)": dict(modulate_denominator=False),
    "plan warp 1.0 (even gaps)": dict(budget_warp=1.0),
    "plan warp 1.15": dict(budget_warp=1.15),
    "plan warp 1.5": dict(budget_warp=1.5),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--models", nargs="+", default=["mnist-dit", "mnist-flux"])
    ap.add_argument("--steps", nargs="+", type=int, default=[20, 28, 50])
    ap.add_argument("--presets", nargs="+", default=["balanced", "fast"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = list(range(SEED0, SEED0 + args.samples))
    labels = [s % 10 for s in seeds]
    latents = metrics.seeded_latents(seeds)
    lines = ["| model | N | preset | variant | compute | PSNR vs full | Δ vs preset (dB) | schedule |",
             "|---|---|---|---|---|---|---|---|"]
    for model in args.models:
        for steps in args.steps:
            full = sample(models.load(model), labels, latents, steps)
            for preset in args.presets:
                base = None
                for name in args.variants:
                    policy = dataclasses.replace(Policy.preset(preset), **VARIANTS[name])
                    pipe = models.load(model)
                    tcpade_fx.compile(pipe, policy=policy)
                    psnr = metrics.psnr(full, sample(pipe, labels, latents, steps))
                    mask = pipe.tcpade.stats.decisions()
                    base = psnr if name == "preset" else base
                    delta = "—" if base is None or name == "preset" else f"{psnr - base:+.2f}"
                    line = (f"| {model} | {steps} | {preset} | {name} | {mask.count('C') / len(mask):.2f} "
                            f"| {psnr:.2f} | {delta} | `{mask}` |")
                    lines.append(line)
                    print(line, flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
