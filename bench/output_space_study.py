"""Which quantity should a skipped step extrapolate? The model's velocity v, its data prediction x̂0 = x − σ·v, or
the block stack's hidden residual (TC-Padé)? A study harness on the image models, not the library.

    python bench/output_space_study.py MODEL:STEPS:PRESET ... [--samples 16] [--seed0 5000]
        [--variants v:pade:1 x0:pade:1 x0:taylor:1 ...]

Each cell first runs the library's preset through ``tcpade_fx.compile`` (its PSNR and schedule), then replaces the
pipeline's velocity function on that same schedule: computed steps run the transformer and record per guidance
branch the chosen quantity; skipped steps extrapolate it over σ from the newest nodes with ``tcpade_fx.pade``'s
extrapolant and turn it back into a velocity at the step's own x:

* ``v``: the velocity itself (no dependence on x: what an output-level cache does);
* ``x0``: x̂0 = x − σ·v, then v = (x − x̂0) / σ: a drift of x moves the velocity as a flow model's does off the data
  (the data estimate is kept, the noise estimate follows x);
* ``eps``: ε̂ = x + (1 − σ)·v, then v = (ε̂ − x) / (1 − σ).

A variant is ``QUANTITY:METHOD:ORDER`` (method ``pade`` / ``taylor`` / ``reuse``). PSNR vs the full Euler run of the
same seeds; the median per-sample gain over the library's preset.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "bench"))
from benchmark import Bench  # noqa: E402
from extrapolant_check import per_sample_mse  # noqa: E402
from tcpade_fx import metrics, pade  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("cells", nargs="+")
ap.add_argument("--samples", type=int, default=16)
ap.add_argument("--seed0", type=int, default=5000)
ap.add_argument("--variants", nargs="+", default=["v:pade:1", "x0:pade:1", "x0:taylor:1", "eps:pade:1"])
ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "output-space-study.jsonl")
args = ap.parse_args()
torch.set_num_threads(1)


def to_quantity(kind: str, x, sigma, v):
    if kind == "v":
        return v
    if kind == "x0":
        return x - sigma * v
    if kind == "eps":
        return x + (1 - sigma) * v
    raise ValueError(kind)


def to_velocity(kind: str, x, sigma, q):
    if kind == "v":
        return q
    if kind == "x0":
        return (x - q) / sigma
    if kind == "eps":
        return (q - x) / (1 - sigma)
    raise ValueError(kind)


def run_variant(bench: Bench, steps: int, schedule: str, variant: str, given: dict) -> torch.Tensor:
    kind, method, order = variant.split(":")
    pipe = bench.pipe(bench.euler())
    inner = pipe._velocity
    state = {"i": 0, "times": [], "nodes": []}

    def velocity(x, sigma, labels):
        i = state["i"]
        state["i"] += 1
        s = sigma.view(-1, *([1] * (x.dim() - 1))).float()
        if schedule[i] == "C" or not state["nodes"]:
            v = inner(x, sigma, labels)
            state["times"].append(float(sigma[0]))
            state["nodes"].append(to_quantity(kind, x.float(), s, v.float()))
            del state["times"][:-4], state["nodes"][:-4]
            return v
        q = pade.extrapolate(state["times"], state["nodes"], float(sigma[0]), method=method, order=int(order))
        return to_velocity(kind, x.float(), s, q).to(x.dtype)

    pipe._velocity = velocity
    out = []
    for i in range(0, len(given["labels"]), bench.batch):
        state.update(i=0, times=[], nodes=[])
        out.append(pipe(given["labels"][i:i + bench.batch], latents=given["latents"][i:i + bench.batch],
                        num_inference_steps=steps, guidance_scale=bench.guidance, output_type="pt").images)
    return torch.cat(out)


for cell in args.cells:
    model, steps, preset = cell.split(":")
    steps = int(steps)
    bench = Bench(model, samples=1, timing_samples=1, repeats=1, batch=16)
    seeds = list(range(args.seed0, args.seed0 + args.samples))
    given = bench.given(seeds)
    full = bench.sample(bench.pipe(bench.euler()), steps, **given)
    lib = bench.sample(bench.pipe(bench.euler(), policy=preset), steps, **given)
    schedule = bench.schedules[0]
    lib_err = per_sample_mse(full, lib)
    print(f"{cell} schedule {schedule}  library {metrics.psnr(full, lib):6.2f}", flush=True)
    for variant in args.variants:
        images = run_variant(bench, steps, schedule, variant, given)
        err = per_sample_mse(full, images)
        gain = (10 * torch.log10(lib_err / err)).median().item()
        row = {"cell": cell, "schedule": schedule, "variant": variant, "samples": args.samples, "seed0": args.seed0,
               "psnr": round(metrics.psnr(full, images), 3), "library": round(metrics.psnr(full, lib), 3),
               "median_gain": round(gain, 3)}
        print(f"  {variant:<14} {row['psnr']:6.2f}  (median {gain:+.2f} over the library)", flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
