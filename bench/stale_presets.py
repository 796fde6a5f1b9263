"""Which TC-Padé preset rows of the benchmark a controller change made stale: re-run each preset on the
benchmark's own seeds and batch (no timing) and compare its schedule with the stored row's.

    python bench/stale_presets.py [--models mnist-dit mnist-flux] [--steps 20 28 50] [--drop]

Prints, per cell, the stored and the new schedule and PSNR vs the full run (the benchmark's cached full run,
bench/results/cache/, or a fresh one). ``--drop`` moves every row whose values depend on a changed schedule (the
preset row, its same-schedule replays, and the rows matched to its compute) to
bench/results/superseded-<model>.jsonl, so that the next ``python bench/benchmark.py`` run measures them again.
Run it while no benchmark is writing to the results.
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

import tcpade_fx  # noqa: E402
from tcpade_fx import metrics, models  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PRESETS = ("quality", "balanced", "fast")


def dependent(label: str, preset: str) -> bool:
    """Rows whose schedule or compute come from the preset's row (bench/benchmark.py run_model)."""
    return label == f"TC-Padé {preset}" or label.endswith(f"on {preset} schedule") or (
        label == f"TC-Padé {preset} on UniPC")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mnist-dit", "mnist-flux"])
    ap.add_argument("--steps", nargs="+", type=int, default=[20, 28, 50])
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--drop", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = list(range(args.samples))
    labels = [s % 10 for s in seeds]
    latents = metrics.seeded_latents(seeds)
    for model in args.models:
        path = RESULTS / f"{model}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        stale: set[tuple[int, str]] = set()
        for n in args.steps:
            cached = RESULTS / "cache" / f"{model}-euler-{n}-{args.samples}.pt"
            full = torch.load(cached, weights_only=True) if cached.exists() else None
            for preset in PRESETS:
                stored = next((r for r in rows if r["steps"] == n and r["label"] == f"TC-Padé {preset}"
                               and r["samples"] == args.samples), None)
                pipe = tcpade_fx.compile(models.load(model), policy=preset)
                with torch.no_grad():
                    images = pipe(labels, latents=latents, num_inference_steps=n, guidance_scale=1.5,
                                  output_type="pt").images
                mask = pipe.tcpade.stats.decisions()
                if full is None:
                    with torch.no_grad():
                        full = models.load(model)(labels, latents=latents, num_inference_steps=n,
                                                  guidance_scale=1.5, output_type="pt").images
                old = stored["schedule"] if stored else None
                old_psnr = f"{stored['psnr_full']:.2f}" if stored else "—"
                changed = old != mask
                print(f"{model} N={n} {preset}: {'CHANGED' if changed else 'same'}  stored `{old}` {old_psnr} dB"
                      f"  now `{mask}` {metrics.psnr(full, images):.2f} dB", flush=True)
                if changed:
                    stale.add((n, preset))
        if args.drop and stale:
            keep, drop = [], []
            for r in rows:
                is_stale = r["samples"] == args.samples or r.get("fd_only")
                hit = any(r["steps"] == n and dependent(r["label"], p) for n, p in stale)
                (drop if hit and is_stale else keep).append(r)
            with open(RESULTS / f"superseded-{model}.jsonl", "a") as f:
                for r in drop:
                    f.write(json.dumps(r) + "\n")
            path.write_text("".join(json.dumps(r) + "\n" for r in keep))
            print(f"{model}: moved {len(drop)} rows to superseded-{model}.jsonl", flush=True)


if __name__ == "__main__":
    main()
