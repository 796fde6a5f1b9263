"""Wall-clock cost of the fitted modulation (Policy.modulate_denominator): the same preset with it on and off and
the full run, interleaved, 1 thread, median of 7 (mnist-dit, 16 images, 28 steps).

    python bench/modulation_cost.py [--model mnist-dit] [--presets fast balanced]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tcpade_fx  # noqa: E402
from tcpade_fx import Policy, metrics, models  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist-dit")
    ap.add_argument("--presets", nargs="+", default=["fast", "balanced"])
    ap.add_argument("--steps", type=int, default=28)
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = list(range(16))
    labels, latents = [s % 10 for s in seeds], metrics.seeded_latents(seeds)
    for preset in args.presets:
        pipes = {
            "on": tcpade_fx.compile(models.load(args.model), policy=preset),
            "off": tcpade_fx.compile(models.load(args.model),
                                     policy=Policy.preset(preset).replace(modulate_denominator=False)),
            "full": models.load(args.model),
        }

        def run(pipe):
            pipe(labels, latents=latents, num_inference_steps=args.steps, guidance_scale=1.5, output_type="pt")

        for pipe in pipes.values():
            run(pipe)
        seconds = {k: [] for k in pipes}
        for _ in range(7):
            for k in ("full", "on", "off"):
                t0 = time.perf_counter()
                run(pipes[k])
                seconds[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in seconds.items()}
        print(f"{args.model} {preset}: median s {({k: round(v, 3) for k, v in med.items()})}; speedup with modulation "
              f"{med['full'] / med['on']:.2f}x, without {med['full'] / med['off']:.2f}x; modulation costs "
              f"{100 * (med['on'] / med['off'] - 1):+.1f} % of the run")


if __name__ == "__main__":
    main()
