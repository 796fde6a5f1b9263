"""Padé [1/1] vs Taylor-1 vs the TC-Padé preset on the preset's own schedule, at more samples than the benchmark's
16 (seeds of no other study), each total also read in blocks of 16 samples to show the spread a 16-sample cell
has, and per sample: the median gain in dB over the preset and the share of samples a row predicts better than the
preset (is a lead broad, or a few samples?). PSNR vs the full Euler run, sampled as the benchmark does (mnist-wan: over all frames, shift 3, guidance 5;
the image models: shift 1, guidance 1.5).

    python bench/extrapolant_check.py [--models mnist-wan] [--presets balanced] [--steps 28 50] [--seed0 200]
                                          [--samples 48]
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
from granularity_study import replay_policy  # noqa: E402
from tcpade_fx import metrics  # noqa: E402


def per_sample_mse(full: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample (a clip's frames together) against the full run."""
    return ((out.float() - full.float()) ** 2).flatten(1).mean(1).clamp_min(1e-20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mnist-wan"])
    ap.add_argument("--presets", nargs="+", default=["balanced"])
    ap.add_argument("--steps", nargs="+", type=int, default=[28, 50])
    ap.add_argument("--seed0", type=int, default=200)
    ap.add_argument("--samples", type=int, default=48)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for model in args.models:
        bench = Bench(model, args.samples, timing_samples=0, repeats=0, batch=16)
        seeds = list(range(args.seed0, args.seed0 + args.samples))
        given = bench.given(seeds)
        for n in args.steps:
            full = bench.sample(bench.pipe(bench.euler()), n, **given)
            for preset in args.presets:
                rows = {f"TC-Padé {preset}": bench.sample(bench.pipe(bench.euler(), preset), n, **given)}
                mask = bench.schedules[0]
                for method, label in (("pade", "Padé [1/1]"), ("taylor", "Taylor-1")):
                    policy = replay_policy(method, mask)
                    rows[f"{label} on {preset} schedule"] = bench.sample(bench.pipe(bench.euler(), policy), n, **given)
                preset_mse = per_sample_mse(full, rows[f"TC-Padé {preset}"])
                for label, out in rows.items():
                    blocks = [round(metrics.psnr(full[i:i + 16], out[i:i + 16]), 2) for i in range(0, args.samples, 16)]
                    gain = 10 * torch.log10(preset_mse / per_sample_mse(full, out))  # dB over the preset, per sample
                    print(json.dumps({"model": model, "steps": n, "seed0": args.seed0, "samples": args.samples,
                                      "row": label, "schedule": mask, "psnr": round(metrics.psnr(full, out), 2),
                                      "psnr_per_16": blocks, "median_gain_over_preset_db": round(float(gain.median()), 2),
                                      "share_better_than_preset": round(float((gain > 0).float().mean()), 2)},
                                     ensure_ascii=False), flush=True)

if __name__ == "__main__":
    main()
