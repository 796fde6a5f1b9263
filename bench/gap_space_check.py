"""Policy.gap_space in the library: each preset as shipped with the gap correction in the sample ("sample"), in
residual units ("residual", as it shipped until the twelfth session), in the sample for every gap, and off.

    python bench/gap_space_check.py --models mnist-dit mnist-flux --steps 20 28 50 --presets balanced fast quality \
        [--seed0 7000] [--samples 48]

PSNR vs the full Euler run of the same seeds, the median per-sample gain over "residual" and the share of samples
closer than with it (bench/ADAPTIVE_STUDY.md section 14).
"""
import argparse
import dataclasses
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "bench"))
from benchmark import Bench  # noqa: E402
from extrapolant_check import per_sample_mse  # noqa: E402
from tcpade_fx import metrics  # noqa: E402
from tcpade_fx.policy import PRESETS  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--models", nargs="+", default=["mnist-dit", "mnist-flux"])
ap.add_argument("--steps", nargs="+", type=int, default=[20, 28, 50])
ap.add_argument("--presets", nargs="+", default=["balanced", "fast", "quality"])
ap.add_argument("--seed0", type=int, default=7000)
ap.add_argument("--samples", type=int, default=48)
args = ap.parse_args()
torch.set_num_threads(1)

seeds = list(range(args.seed0, args.seed0 + args.samples))
for model in args.models:
    bench = Bench(model, samples=1, timing_samples=1, repeats=1, batch=16)
    given = bench.given(seeds)
    for steps in args.steps:
        full = bench.sample(bench.pipe(bench.euler()), steps, **given)
        for preset in args.presets:
            base = PRESETS[preset]
            variants = {"residual": dataclasses.replace(base, gap_space="residual"),
                        "sample": dataclasses.replace(base, gap_space="sample"),
                        "sample-inf": dataclasses.replace(base, gap_space="sample", gap_span_limit=math.inf),
                        "off": dataclasses.replace(base, gap_correction=0.0)}
            ref = None
            for name, policy in variants.items():
                out = bench.sample(bench.pipe(bench.euler(), policy=policy), steps, **given)
                err = per_sample_mse(full, out)
                ref = err if ref is None else ref
                gain = (10 * torch.log10(ref / err)).median().item()
                print(f"{model} {steps} {preset} {name:<11} {metrics.psnr(full, out):6.2f} median {gain:+.2f} over "
                      f"residual, better {(err < ref).float().mean():.2f}", flush=True)
