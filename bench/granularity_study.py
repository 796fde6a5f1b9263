"""Issue 13 part 3: does predicting at a finer granularity than the whole block stack pay, on the same schedule?

    python bench/granularity_study.py [--samples 24] [--models mnist-dit mnist-flux] [--steps 20 28 50]
                                      [--presets balanced fast] [--out FILE]

For each model, step count and preset the schedule is the preset's own (the decisions of a real run: the budget
plan); every row below computes the same steps and predicts the others, so each row's compute is the preset's (up
to what a finer granularity keeps running on predicted steps: gates, adaLN, norms, the first block's input
projections, below 2 % of the stack's matmul FLOPs on these models). What is predicted on a predicted step:

* ``stack``: the whole block stack's residual (what TC-Padé ships): the preset itself (``TC-Padé``, with its
  coefficient modulation and stage orders) and the plain extrapolants replayed on its schedule through the library
  (``Policy(schedule="explicit", mask=...)``);
* ``block``: every block's residual (output − input, per stream), each block then fed the predicted stream of the
  block before it: the prediction errors of the blocks do not add up unseen, each block's input is the predicted
  one;
* ``module``: the outputs of the attention and feed-forward modules of every block (diffusers' TaylorSeer units,
  ``peers.taylorseer_identifiers``: Flux single blocks forecast ``proj_out`` and skip ``attn`` / ``proj_mlp``):
  adaLN, gates and the residual adds stay live, so the time-embedding path of every block is exact.

mnist-wan (``--models mnist-wan``) samples as the benchmark does (guidance 5 as two calls per step, the bundled
shift-3 Euler scheduler); its finer units keep one history per guidance branch, as the library does.

Extrapolants on the finer units: Padé [1/1] (``tcpade_fx.pade.extrapolate``, per sample, newest 3 computed values)
and Taylor-1 (newest 2), in the model's time. Seeds 3000.. (used by no other study, preset or benchmark), guidance
1.5 as the benchmark. PSNR against the full run of the same seeds (Euler, same steps).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import tcpade_fx  # noqa: E402
from benchmark import Bench, sample_images as sample  # noqa: E402
from tcpade_fx import Policy, metrics, models  # noqa: E402
from tcpade_fx.pade import extrapolate  # noqa: E402

SEED0 = 3000
HISTORY = 3


class UnitForecaster:
    """Replaces the outputs of chosen submodules on the schedule's predicted steps by extrapolations of their own
    computed outputs (a study harness: plain Python wrappers on ``forward``, one state per pipeline call)."""

    def __init__(self, transformer: torch.nn.Module, mask: str, method: str, units: str, branches: int = 1):
        self.mask, self.method, self.time = mask, method, 0.0
        #: transformer calls per denoising step (2 for mnist-wan's separate-call guidance: cond, then uncond); each
        #: branch forecasts from its own history, as the library's per-branch state does
        self.branches, self.calls = branches, -1
        self.histories: dict[tuple[str, int], list[tuple[float, tuple[torch.Tensor, ...]]]] = {}
        self.shapes: dict[str, torch.Tensor] = {}
        self.units = 0  # modules whose outputs are forecast
        transformer.register_forward_pre_hook(self._on_call, with_kwargs=True)
        forecast, skip = unit_patterns(transformer, units)
        for name, module in transformer.named_modules():
            if any(re.fullmatch(p, name) for p in forecast):
                self._wrap(name, module, units == "block")
            elif any(re.fullmatch(p, name) for p in skip):
                self._wrap_skip(name, module)
        if not self.units:
            raise RuntimeError(f"no {units} unit matched in {type(transformer).__name__}")

    def reset(self) -> None:
        self.calls = -1
        self.histories.clear()

    @property
    def step(self) -> int:
        return self.calls // self.branches

    def history(self, name: str) -> list:
        return self.histories.setdefault((name, self.calls % self.branches), [])

    @property
    def computing(self) -> bool:
        return self.step >= len(self.mask) or self.mask[self.step] == "C"

    def _on_call(self, module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        self.calls += 1
        self.time = float(t.flatten()[0])

    def _wrap(self, name: str, module: torch.nn.Module, residual: bool) -> None:
        original = module.forward
        self.units += 1

        def forward(*args, **kwargs):
            streams = _block_inputs(module, args, kwargs) if residual else None
            if self.computing:
                out = original(*args, **kwargs)
                outs = _as_tuple(out)
                values = tuple(o - s for o, s in zip(outs, streams)) if residual else outs
                hist = self.history(name)
                hist.append((self.time, tuple(v.detach().clone() for v in values)))
                del hist[:-HISTORY]
                return out
            hist = self.history(name)
            times = [t for t, _ in hist]
            preds = tuple(extrapolate(times, [v[i] for _, v in hist], self.time, method=self.method, order=1)
                          for i in range(len(hist[-1][1])))
            if residual:
                preds = tuple(s + p for s, p in zip(streams, preds))
            return preds[0] if len(preds) == 1 else preds

        module.forward = forward

    def _wrap_skip(self, name: str, module: torch.nn.Module) -> None:
        original = module.forward

        def forward(*args, **kwargs):
            if self.computing:
                out = original(*args, **kwargs)
                self.shapes[name] = out
                return out
            return torch.zeros_like(self.shapes[name])

        module.forward = forward


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _block_inputs(block, args, kwargs) -> tuple[torch.Tensor, ...]:
    """The streams a block adds its residual to, in the order of its outputs (Flux dual blocks return
    (encoder, hidden), single ones too; the others hidden only)."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if type(block).__name__ in ("FluxTransformerBlock", "FluxSingleTransformerBlock"):
        return (kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None), hidden)
    return (hidden,)


def unit_patterns(transformer, units: str) -> tuple[list[str], list[str]]:
    from peers import taylorseer_identifiers

    if units == "block":
        return [r"((single_)?transformer_blocks|blocks)\.\d+"], []
    return taylorseer_identifiers(transformer, block_level=False)


class Cell:
    """How one model is loaded and sampled in this study: the image models through ``models.load`` at guidance 1.5
    (Euler, shift 1); mnist-wan through the benchmark's :class:`benchmark.Bench` (its guidance 5 as two calls per
    step and its shift-3 Euler scheduler, as a default call samples)."""

    def __init__(self, model: str, seeds: list[int]):
        self.model, self.labels = model, [s % 10 for s in seeds]
        self.bench = Bench(model, len(seeds), 0, 0, len(seeds)) if model == "mnist-wan" else None
        self.branches = self.bench.kind.calls_per_step if self.bench else 1
        self.latents = self.bench.latents_for(seeds) if self.bench else metrics.seeded_latents(seeds)

    def load(self, policy=None):
        if self.bench:
            return self.bench.pipe(self.bench.euler(), policy)
        pipe = models.load(self.model)
        if policy is not None:
            tcpade_fx.compile(pipe, policy=policy)
        return pipe

    def draw(self, pipe, steps: int) -> torch.Tensor:
        if self.bench:
            return self.bench.sample(pipe, steps, self.labels, self.latents)
        return sample(pipe, self.labels, self.latents, steps)


def replay_policy(method: str, mask: str) -> Policy:
    """The plain extrapolant ``method`` (order 1, no modulation) on the explicit schedule ``mask``."""
    return Policy(method=method, order=1, late_order=1, schedule="explicit", mask=mask, modulate_denominator=False)


def run_cell(cell: Cell, steps: int, preset: str, full,
             mask: str | None = None) -> tuple[str, list[tuple[str, str, float, float]]]:
    """The rows of one cell; ``mask``: a given schedule instead of the preset's (then no TC-Padé row)."""
    rows = []
    if mask is None:
        pipe = cell.load(preset)
        images = cell.draw(pipe, steps)
        mask = pipe.tcpade.stats.decisions()
        rows.append(("stack", f"TC-Padé {preset}", mask.count("C") / len(mask), metrics.psnr(full, images)))
    compute = mask.count("C") / len(mask)
    for method, name in (("pade", "Padé [1/1]"), ("taylor", "Taylor-1")):
        pipe = cell.load(replay_policy(method, mask))
        rows.append(("stack", name, compute, metrics.psnr(full, cell.draw(pipe, steps))))
    for units in ("block", "module"):
        for method, name in (("pade", "Padé [1/1]"), ("taylor", "Taylor-1")):
            pipe = cell.load()
            forecaster = UnitForecaster(pipe.transformer, mask, method, units, cell.branches)
            forecaster.reset()
            rows.append((units, name, compute, metrics.psnr(full, cell.draw(pipe, steps))))
    return mask, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--models", nargs="+", default=["mnist-dit", "mnist-flux"])
    ap.add_argument("--steps", nargs="+", type=int, default=[20, 28, 50])
    ap.add_argument("--presets", nargs="+", default=["balanced", "fast"])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--taylorseer-schedule", type=int, default=None, metavar="K",
                    help="instead of the presets' schedules: diffusers TaylorSeer's with cache_interval K (the "
                         "benchmark's warm-up, max(3, ceil(0.1 (N - 1))) steps, then every K-th step computed)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = list(range(SEED0, SEED0 + args.samples))
    lines = ["| model | N | preset | schedule | granularity | extrapolant | compute | PSNR vs full |",
             "|---|---|---|---|---|---|---|---|"]
    for model in args.models:
        cell = Cell(model, seeds)
        for steps in args.steps:
            full = cell.draw(cell.load(), steps)
            for preset in args.presets if args.taylorseer_schedule is None else [f"TaylorSeer k={args.taylorseer_schedule}"]:
                given = None
                if args.taylorseer_schedule is not None:
                    warm, k = min(steps, max(3, math.ceil(0.1 * (steps - 1)))), args.taylorseer_schedule
                    given = "".join("C" if i < warm or (i - warm) % k == 0 else "." for i in range(steps))
                mask, rows = run_cell(cell, steps, preset, full, given)
                for units, name, compute, psnr in rows:
                    line = f"| {model} | {steps} | {preset} | `{mask}` | {units} | {name} | {compute:.2f} | {psnr:.2f} |"
                    lines.append(line)
                    print(line, flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
