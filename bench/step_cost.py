"""Where a TC-Padé run's time goes, and why the measured speedup falls short of the ideal N / computed.

    python bench/step_cost.py [--models mnist-dit mnist-flux] [--presets fast balanced] [--steps 28] [--repeats 5]

The full run and the TC-Padé run of the same 16 seeds are interleaved (1 thread, median per quantity over the
repeats), timed by default in CPU time of the one thread (``--clock wall`` for wall time): on a shared machine the
wall time of a single call is mostly other processes' noise, the CPU time is what the call costs. Every transformer call is timed and sorted by what the runtime did (computed / predicted, from
``stats.records``); inside the calls, the runtime's numerics (extrapolation, the a-posteriori check and modulation
fit, stacking the history) are timed separately. What is left of a run outside the transformer calls is the
pipeline's own per-step work (scheduler step, CFG combination, ...), which no cache skips.

With N steps of which C are computed, the ideal time is T_full · C / N; the gap to it splits into

* compute-step overhead: C · (computed call − full call) — the check, the modulation fit, stacking the history;
* predicted calls: (N − C) · predicted call — the head/tail graphs around the skipped stack and the extrapolation;
* pipeline per step: (N − C) · the full run's non-transformer time per step (plus whatever else differs).

Writes nothing; prints a Markdown table (bench/STEP_COST.md holds a committed run).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tcpade_fx  # noqa: E402
from benchmark import SAMPLES, ImageSamples  # noqa: E402
from granularity_check import variants  # noqa: E402
from tcpade_fx import metrics, models, runtime  # noqa: E402

now = time.thread_time  # CPU time of this (single) thread: robust to sharing the cores; --clock wall for wall time

NUMERICS = ("extrapolate_stacked", "denominator_partials", "relative_error_partials", "modulation_partials",
            "nonfinite_partial", "replace_nonfinite_", "input_gate_terms")  # the runtime keeps its history in a ring: no stack_history


class Clock:
    """Accumulates time per name, attributed to the outermost timed function only (what the runtime itself
    calls), while the transformer calls are timed as a whole."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: list[tuple[bool | None, float]] = []  # (computed?, seconds) per transformer call
        self.depth = 0

    def reset(self) -> None:
        self.seconds, self.calls = {}, []


CLOCK = Clock()


def _timed(name: str, fn):
    def wrapper(*args, **kwargs):
        CLOCK.depth += 1
        t0 = now()
        try:
            return fn(*args, **kwargs)
        finally:
            dt = now() - t0
            CLOCK.depth -= 1
            if CLOCK.depth == 0:
                CLOCK.seconds[name] = CLOCK.seconds.get(name, 0.0) + dt

    return wrapper


def instrument_numerics() -> None:
    """Time the runtime's numerics where the runtime looks them up (module globals of tcpade_fx.runtime)."""
    for name in NUMERICS:
        setattr(runtime, name, _timed(name, getattr(runtime, name)))
    runtime.TCPadeRuntime._check_partials = _timed("check and modulation fit",
                                                   runtime.TCPadeRuntime._check_partials)


def instrument_graphs(rt) -> None:
    """Time the compute and predict graphs of the runtime's current input signature (after the first call)."""
    graphs = rt.graphs
    for name in ("compute", "predict"):
        object.__setattr__(graphs, name, _timed(f"{name} graph", getattr(graphs, name)))


def instrument_calls(pipe) -> None:
    """Time every transformer call; label it computed / predicted from the runtime's newest record."""
    transformer = pipe.transformer
    inner = transformer.forward
    rt = getattr(pipe, "tcpade", None)

    def forward(*args, **kwargs):
        t0 = now()
        out = inner(*args, **kwargs)
        computed = rt.stats.records[-1].computed if rt is not None else None
        CLOCK.calls.append((computed, now() - t0))
        return out

    transformer.forward = forward


def measure(model: str, preset: str, steps: int, repeats: int, variant: str = "shipped") -> dict:
    seeds = list(range(16))
    kind_of = SAMPLES.get(model, ImageSamples)()  # mnist-wan: clip latents, guidance 5 as two calls per step
    labels, latents = [s % 10 for s in seeds], metrics.seeded_latents(seeds, kind_of.latent_shape)
    branches = kind_of.calls_per_step
    policy = dict(variants(preset))[variant]
    pipes = {"full": models.load(model), "tc": tcpade_fx.compile(models.load(model), policy=policy)}
    for pipe in pipes.values():
        instrument_calls(pipe)
    samples: dict[str, list[float]] = {}

    def keep(key: str, value: float) -> None:
        samples.setdefault(key, []).append(value)

    for rep in range(repeats + 1):  # the first round warms up (capture, verification)
        for kind, pipe in pipes.items():
            CLOCK.reset()
            t0 = now()
            pipe(labels, latents=latents, num_inference_steps=steps, guidance_scale=kind_of.guidance, output_type="pt")
            total = now() - t0
            if rep == 0:
                if kind == "tc":
                    instrument_graphs(pipe.tcpade)
                continue
            calls = CLOCK.calls
            keep(f"{kind} total", total)
            keep(f"{kind} outside calls", total - sum(dt for _, dt in calls))
            if kind == "full":
                keep("full call", statistics.mean(dt for _, dt in calls))
                continue
            computed = [dt for c, dt in calls if c]
            predicted = [dt for c, dt in calls if not c]
            keep("computed calls", len(computed))
            keep("computed call", statistics.mean(computed))
            keep("predicted call", statistics.mean(predicted) if predicted else 0.0)
            for name, seconds in CLOCK.seconds.items():
                keep(f"numerics {name}", seconds)
    med = {k: statistics.median(v) for k, v in samples.items()}
    # in transformer calls: the image pipelines call once per step, mnist-wan twice (cond, uncond)
    n, c = steps * branches, med["computed calls"]
    full, tc = med["full total"], med["tc total"]
    ideal_time = full * c / n
    gap = tc - ideal_time
    parts = {
        "compute-step overhead": c * (med["computed call"] - med["full call"]),
        "predicted calls": (n - c) * med["predicted call"],
        "pipeline per step": med["tc outside calls"] - med["full outside calls"] * c / n,
    }
    return {"model": model, "preset": preset if variant == "shipped" else f"{preset}, {variant}", "steps": steps, "computed": c / branches, "full": full, "tc": tc,
            "measured": full / tc, "ideal": n / c, "gap": gap, "parts": parts, "med": med}


def table(rows: list[dict]) -> str:
    lines = [
        "| model | preset | computed / N | measured | ideal | measured / ideal | full call ms | computed call ms "
        "| predicted call ms | outside calls per step ms | gap: compute-step overhead | gap: predicted calls "
        "| gap: pipeline per step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m, g = r["med"], r["gap"]
        share = {k: f"{100 * v / g:.0f} %" if g > 0 else "" for k, v in r["parts"].items()}
        lines.append(
            f"| {r['model']} | {r['preset']} | {r['computed']:.0f} / {r['steps']} | {r['measured']:.2f}x "
            f"| {r['ideal']:.2f}x | {r['measured'] / r['ideal']:.0%} | {1e3 * m['full call']:.1f} "
            f"| {1e3 * m['computed call']:.1f} | {1e3 * m['predicted call']:.1f} "
            f"| {1e3 * m['full outside calls'] / r['steps']:.1f} | {share['compute-step overhead']} "
            f"| {share['predicted calls']} | {share['pipeline per step']} |"
        )
    lines += ["", "Inside the TC-Padé run (ms per run, median; each function counted where the runtime calls it: "
              "*extrapolate_stacked* is the predicted steps' extrapolation, the computed steps' two are in *check "
              "and modulation fit*):", ""]
    for r in rows:
        numerics = {k.removeprefix("numerics "): v for k, v in r["med"].items() if k.startswith("numerics ")}
        lines.append(f"- {r['model']} {r['preset']}: " + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in
                                                                 sorted(numerics.items())))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mnist-dit", "mnist-flux"])
    ap.add_argument("--presets", nargs="+", default=["fast", "balanced"])
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    ap.add_argument("--variant", choices=[v for v, _ in variants("balanced")], default="shipped",
                    help="the preset as shipped, or forecasting every block's attention/FFN outputs "
                         "(granularity='modules') with Taylor-1 or with the preset's TC-Padé numerics")
    args = ap.parse_args()
    global now
    now = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(1)
    instrument_numerics()
    rows = []
    for model in args.models:
        for preset in args.presets:
            rows.append(measure(model, preset, args.steps, args.repeats, args.variant))
            print(f"{model} {preset}: measured {rows[-1]['measured']:.2f}x, ideal {rows[-1]['ideal']:.2f}x",
                  file=sys.stderr, flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
