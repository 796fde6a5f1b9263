"""What Policy.gap_space="sample" costs in time over "residual": one more predict-graph run per corrected gap step.

    python bench/gap_space_cost.py [--models mnist-dit mnist-flux] [--steps 20 50] [--presets fast balanced]
        [--samples 16] [--repeats 5]

One thread; each cell runs the two policies alternately ``--repeats`` times (after a warm-up of each) and prints
the median of t(sample) / t(residual) over the pairs, with the two runs' medians.
"""
import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "bench"))
from benchmark import Bench  # noqa: E402
from tcpade_fx.policy import PRESETS  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--models", nargs="+", default=["mnist-dit", "mnist-flux"])
ap.add_argument("--steps", nargs="+", type=int, default=[20, 50])
ap.add_argument("--presets", nargs="+", default=["fast", "balanced"])
ap.add_argument("--samples", type=int, default=16)
ap.add_argument("--repeats", type=int, default=5)
args = ap.parse_args()
torch.set_num_threads(1)

for model in args.models:
    bench = Bench(model, samples=1, timing_samples=1, repeats=1, batch=args.samples)
    given = bench.given(list(range(args.samples)))
    for steps in args.steps:
        for preset in args.presets:
            pipes = {space: bench.pipe(bench.euler(), policy=dataclasses.replace(PRESETS[preset], gap_space=space))
                     for space in ("residual", "sample")}
            seconds = {space: [] for space in pipes}
            for space, pipe in pipes.items():
                bench.sample(pipe, steps, **given)  # warm-up: capture
            for _ in range(args.repeats):
                for space, pipe in pipes.items():
                    t0 = time.perf_counter()
                    bench.sample(pipe, steps, **given)
                    seconds[space].append(time.perf_counter() - t0)
            ratio = statistics.median(s / r for s, r in zip(seconds["sample"], seconds["residual"]))
            print(f"{model} {steps} {preset}: sample / residual {ratio:.3f} (residual "
                  f"{statistics.median(seconds['residual']):.2f} s, sample {statistics.median(seconds['sample']):.2f} s)",
                  flush=True)
