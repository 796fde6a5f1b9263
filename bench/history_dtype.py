"""What does storing the residual history in bfloat16 (Policy(history_dtype=...)) cost against float32?

    python bench/history_dtype.py [--samples 16] [--steps 20] [--model mnist-dit]

The bundled model (float32 weights) with "balanced" and history_dtype "float32" vs "bfloat16" vs "float16": PSNR
against the full run of the same seeds (0..samples-1), over the batch and per seed (mean, min). The table is
bench/HISTORY_DTYPE.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tcpade_fx  # noqa: E402
from tcpade_fx import Policy, metrics, models  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--model", default="mnist-dit")
    args = ap.parse_args()
    seeds = list(range(args.samples))
    labels = [s % 10 for s in seeds]
    latents = metrics.seeded_latents(seeds)

    def sample(policy=None):
        pipe = models.load(args.model)
        if policy is not None:
            tcpade_fx.compile(pipe, policy=policy)
        with torch.no_grad():
            images = pipe(labels, latents=latents, num_inference_steps=args.steps, guidance_scale=1.5,
                          output_type="pt").images
        return images, (pipe.tcpade.stats if policy is not None else None)

    full, _ = sample()
    print(f"{args.model}, {args.steps} steps, \"balanced\", {args.samples} seeds; PSNR vs full (dB)\n")
    print("| history_dtype | batch PSNR | per-seed mean | per-seed min | compute fraction | schedule |")
    print("|---|---|---|---|---|---|")
    for dtype in ("float32", "bfloat16", "float16"):
        images, stats = sample(Policy.preset("balanced").replace(history_dtype=dtype, name="balanced"))
        per = [metrics.psnr(full[i:i + 1], images[i:i + 1]) for i in range(len(seeds))]
        print(f"| {dtype} | {metrics.psnr(full, images):.2f} | {sum(per) / len(per):.2f} | {min(per):.2f} "
              f"| {stats.compute_fraction:.3f} | `{stats.decisions(0)}` |", flush=True)


if __name__ == "__main__":
    main()
