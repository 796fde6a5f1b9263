"""Compute fraction of each preset on the tiny offline diffusers pipelines, and inductor compile counts.

    python bench/pipeline_fractions.py                 # prints a markdown table (a few minutes with inductor)
    python bench/pipeline_fractions.py --no-inductor   # fractions only (under a minute)

The compute fraction is the share of transformer calls that ran the block stack (both CFG branches counted for
separate-call CFG). It is a property of the schedule, which the compute budget and the stage rules fix at these
step counts; random weights say nothing about the quality at that fraction (see the MNIST benchmarks for that).
"""

from __future__ import annotations

import argparse
import functools
import platform
import time

import torch

import tcpade_fx
from tcpade_fx import PRESET_AIMS, Policy
from tcpade_fx.testing_pipelines import (
    output_of,
    tiny_dit_pipeline,
    tiny_flux_pipeline,
    tiny_pixart_pipeline,
    tiny_sd3_pipeline,
    tiny_wan_pipeline,
)

PIPELINES = {
    "dit": (tiny_dit_pipeline, "DiTPipeline, batched CFG"),
    "flux": (tiny_flux_pipeline, "FluxPipeline, no CFG"),
    "flux_true_cfg": (functools.partial(tiny_flux_pipeline, true_cfg_scale=3.0), "FluxPipeline, true CFG (2 calls)"),
    "wan": (tiny_wan_pipeline, "WanPipeline, CFG (2 calls)"),
    "sd3": (tiny_sd3_pipeline, "StableDiffusion3Pipeline, batched CFG"),
    "pixart": (tiny_pixart_pipeline, "PixArtSigmaPipeline, batched CFG"),
}
PRESETS = ("quality", "balanced", "fast")


def run(pipe, kwargs, steps: int) -> torch.Tensor:
    return output_of(pipe(**kwargs, num_inference_steps=steps, generator=torch.Generator().manual_seed(0)))


def fractions(name: str, steps_list: list[int]) -> dict:
    build, _ = PIPELINES[name]
    pipe, kwargs = build()
    row = {}
    for preset in PRESETS:
        tcpade_fx.compile(pipe, policy=preset)
        for steps in steps_list:
            run(pipe, kwargs, steps)
            stats = pipe.tcpade.stats
            row[(preset, steps)] = (stats.compute_fraction, stats.decisions(0))
    tcpade_fx.disable(pipe)
    return row


def inductor_counts(name: str, steps: int) -> tuple[dict, dict, float, float]:
    """Compile counts after a balanced run, then after a "full" run on the same compiled graphs."""
    build, _ = PIPELINES[name]
    pipe, kwargs = build()
    reference = run(pipe, kwargs, steps)
    start = time.perf_counter()
    tcpade_fx.compile(pipe, policy="balanced", backend="inductor")
    run(pipe, kwargs, steps)
    seconds = time.perf_counter() - start
    balanced = dict(pipe.tcpade.stats.compiles)
    pipe.tcpade.policy = Policy.preset("full")
    full = run(pipe, kwargs, steps)
    after_full = dict(pipe.tcpade.stats.compiles)
    rel = float((full - reference).norm() / reference.norm())
    tcpade_fx.disable(pipe)
    return balanced, after_full, seconds, rel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 28])
    parser.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=list(PIPELINES))
    parser.add_argument("--no-inductor", action="store_true")
    parser.add_argument("--inductor-steps", type=int, default=28)
    args = parser.parse_args()
    torch.set_num_threads(1)

    print(f"torch {torch.__version__}, diffusers {__import__('diffusers').__version__}, {platform.machine()}, "
          "1 thread, tiny random-weight pipelines\n")
    print("## Compute fraction (block-stack calls / transformer calls)\n")
    header = " | ".join(f"{p} @{s}" for p in PRESETS for s in args.steps)
    print(f"| pipeline | {header} |")
    print("|---|" + "---:|" * (len(PRESETS) * len(args.steps)))
    schedules = {}
    for name in args.pipelines:
        row = fractions(name, args.steps)
        cells = " | ".join(f"{row[(p, s)][0]:.3f}" for p in PRESETS for s in args.steps)
        print(f"| {name} ({PIPELINES[name][1]}) | {cells} |", flush=True)
        schedules[name] = row
    aims = ", ".join(f"{p} {PRESET_AIMS[p]:.2f}" for p in PRESETS)
    print(f"\nPreset aims (compute_budget): {aims}.\n")
    print("Schedules, branch 0 (C computed, . predicted):\n")
    print("```")
    for name, row in schedules.items():
        for (preset, steps), (_, schedule) in row.items():
            print(f"{name:14s} {preset:9s} {steps:3d}  {schedule}")
    print("```")

    if args.no_inductor:
        return
    n = args.inductor_steps
    print(f"\n## backend=\"inductor\": compile counts ({n} steps balanced, then {n} steps \"full\" on the same "
          "graphs)\n")
    print("| pipeline | after balanced | after full | first balanced run incl. compile (s) "
          "| full vs untouched eager (rel.) |")
    print("|---|---|---|---:|---:|")
    for name in args.pipelines:
        balanced, after_full, seconds, rel = inductor_counts(name, n)
        print(f"| {name} | {balanced} | {after_full} | {seconds:.1f} | {rel:.1e} |", flush=True)


if __name__ == "__main__":
    main()
