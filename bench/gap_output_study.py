"""Should the gap correction cancel the gap's error in the block stack's residual, or in the sample?
(Policy.gap_correction, bench/ADAPTIVE_STUDY.md sections 12–14.) A study harness on the image models.

    python bench/gap_output_study.py MODEL:STEPS:PRESET ... [--samples 32] [--seed0 6000]
        [--variants none hidden:inf hidden:0.15 output:inf output:0.15]

The library corrects a gap in residual units: once the computed step c that ends it is known, the miss
``κ·σ_c·Σ_k (h_k/σ_k)·(R̂_k − R̃_k)`` (R̂ the gap's predictions, R̃ the interpolant through the newest computed
residuals) is subtracted from a later step's residual, and the tail (the final norm with the step's own adaLN scale
and shift, the output projection) maps it into the sample. That is exact only if the tail maps a residual error to
the same velocity error at every step of the gap. ``output`` does the same in the sample: each gap step's tail is
run again on its own stack input plus R̃_k (head and tail only, no blocks), and the miss
``κ·σ_c·Σ_k (h_k/σ_k)·(v̂_k − ṽ_k)`` is taken off the velocity directly.

Both variants here apply the miss at the computed step c itself (the library applies it at the next predicted step;
``hidden-next`` does that), on this harness's own plain Padé [1/1] prediction (no modulation) over the preset's
schedule (taken from the library's run of the same seeds). ``:L`` is the gap_span_limit (``inf``: every gap; the
last step is always corrected); gaps whose interpolant reaches into the early stage are not corrected, as in the
library. PSNR vs the full Euler run; the median per-sample gain over ``none``.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "bench"))
from benchmark import Bench  # noqa: E402
from extrapolant_check import per_sample_mse  # noqa: E402
from peers import blocks_of  # noqa: E402
from tcpade_fx import Policy, metrics, pade  # noqa: E402
from tcpade_fx.policy import PRESETS  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("cells", nargs="+")
ap.add_argument("--samples", type=int, default=32)
ap.add_argument("--seed0", type=int, default=6000)
ap.add_argument("--variants", nargs="+", default=["none", "hidden:inf", "hidden:0.15", "output:inf", "output:0.15"])
ap.add_argument("--mask", default=None, help="this schedule instead of the preset's")
ap.add_argument("--plain-library", action="store_true",
                help="compare with the library's plain Padé on the same schedule (no modulation, no correction)")
ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gap-output-study.jsonl")
args = ap.parse_args()
torch.set_num_threads(1)


class StackSwitch:
    """Hooks on a transformer's blocks (DiT's one list, or Flux's two: their blocks take and return the text stream
    too): ``compute`` runs them and records the image stream's residual; ``skip`` returns input + forced."""

    def __init__(self, transformer: torch.nn.Module):
        blocks = blocks_of(transformer)
        self.mode, self.forced, self.h_in, self.residual = "compute", None, None, None
        blocks[0].register_forward_pre_hook(self._pre, with_kwargs=True)
        blocks[-1].register_forward_hook(self._post, with_kwargs=True)
        for block in blocks:
            block.forward = self._skippable(block.forward)

    def _skippable(self, forward):
        def run(hidden_states, *a, **k):
            if self.mode != "skip":
                return forward(hidden_states, *a, **k)
            text = k.get("encoder_hidden_states")
            return hidden_states if text is None else (text, hidden_states)
        return run

    def _pre(self, module, a, k):
        self.h_in = a[0] if a else k["hidden_states"]

    def _post(self, module, a, k, out):
        image = out[1] if isinstance(out, tuple) else out
        if self.mode == "skip":
            image = self.h_in + self.forced
            return (out[0], image) if isinstance(out, tuple) else image
        self.residual = (image - self.h_in).float()
        return out


class GapCorrectedSampler:
    """Wraps ``transformer.forward``: decides each call by the schedule (one character per step; the calls of a step
    are its guidance branches, each with its own history) and corrects the gaps by the variant."""

    def __init__(self, transformer, schedule: str, sigmas: list[float], variant: str, early_end: float,
                 calls_per_step: int):
        self.inner, self.schedule, self.sig, self.early_end = transformer.forward, schedule, sigmas, early_end
        self.calls_per_step = calls_per_step
        kind, _, limit = variant.partition(":")
        self.kind, self.limit = kind, float(limit) if limit else math.inf
        self.switch = StackSwitch(transformer)
        transformer.forward = self
        self.calls = 0
        self.branches: dict[int, dict] = {}

    def run(self, a, k, forced=None):
        self.switch.mode, self.switch.forced = ("compute", None) if forced is None else ("skip", forced)
        out = self.inner(*a, **k)
        self.switch.mode = "compute"
        return out[0].float()

    def __call__(self, *a, **k):
        n = len(self.schedule)
        i, b = divmod(self.calls % (n * self.calls_per_step), self.calls_per_step)  # a new call restarts at 0
        self.calls += 1
        st = self.branches.setdefault(b, {})
        if i == 0:
            st.update(nodes=[], gap=[], pending=None)
        s, h = self.sig[i], self.sig[i + 1] - self.sig[i]
        if self.schedule[i] == "C" or not st["nodes"]:
            v = self.run(a, k)
            r = self.switch.residual
            miss = self.miss(st, i, r) if st["gap"] else None
            st["nodes"] = [*st["nodes"], (i, s, r)][-3:]
            st["gap"] = []
            if miss is not None:
                where, m = miss
                if where == "hidden" and self.kind == "hidden-next" and i < n - 1:
                    st["pending"] = m
                elif where == "hidden":
                    v = self.run(a, k, forced=(r - m / h).to(r.dtype))
                else:
                    v = v - m / h
            return (v,)
        nodes = st["nodes"]
        # on two nodes the runtime's [0/1], as TCPadeRuntime._run asks for it
        r_hat = pade.extrapolate([t for _, t, _ in nodes], [r for _, _, r in nodes], s, method="pade",
                                 order=1 if len(nodes) >= 3 else 0)
        forced = r_hat if st["pending"] is None else r_hat - st["pending"] / h
        st["pending"] = None
        v = self.run(a, k, forced=forced)
        v_hat = v if forced is r_hat else self.run(a, k, forced=r_hat)
        st["gap"].append((i, s, h, a, dict(k), r_hat, v_hat))
        return (v,)

    def miss(self, st: dict, c: int, r_c: torch.Tensor):
        if self.kind == "none" or len(st["nodes"]) < 2:
            return None
        n = len(self.schedule)
        older = st["nodes"][-2:]
        if min(step for step, _, _ in older) / (n - 1) < self.early_end:
            return None
        span = older[-1][1] - self.sig[c]
        if c < n - 1 and span * span > self.limit * self.sig[c]:
            return None
        times = [t for _, t, _ in older] + [self.sig[c]]
        rs = [r for _, _, r in older] + [r_c]
        total = 0.0
        for _, s_k, h_k, a_k, k_k, r_hat, v_hat in st["gap"]:
            r_tilde = pade.extrapolate(times, rs, s_k, method="taylor", order=2)  # the quadratic through the 3 nodes
            if self.kind.startswith("hidden"):
                total = total + (h_k / s_k) * (r_hat - r_tilde)
            else:
                total = total + (h_k / s_k) * (v_hat - self.run(a_k, k_k, forced=r_tilde))
        return ("hidden" if self.kind.startswith("hidden") else "output"), self.sig[c] * total


for cell in args.cells:
    model, steps, preset = cell.split(":")
    steps = int(steps)
    bench = Bench(model, samples=1, timing_samples=1, repeats=1, batch=args.samples)
    seeds = list(range(args.seed0, args.seed0 + args.samples))
    given = bench.given(seeds)
    full = bench.sample(bench.pipe(bench.euler()), steps, **given)
    lib = bench.sample(bench.pipe(bench.euler(), policy=preset), steps, **given)
    schedule = args.mask or bench.schedules[0]
    if args.plain_library:
        plain = Policy(schedule="explicit", mask=schedule, modulate_denominator=False, gap_correction=0.0)
        lib = bench.sample(bench.pipe(bench.euler(), policy=plain), steps, **given)
    print(f"{cell} schedule {schedule}  library {metrics.psnr(full, lib):6.2f}", flush=True)
    ref = None
    for variant in args.variants:
        pipe = bench.pipe(bench.euler())
        pipe.scheduler.set_timesteps(steps)
        GapCorrectedSampler(pipe.transformer, schedule, [float(s) for s in pipe.scheduler.sigmas], variant,
                            PRESETS[preset].early_end, bench.kind.calls_per_step)
        images = bench.sample(pipe, steps, **given)
        err = per_sample_mse(full, images)
        ref = err if ref is None else ref
        gain = (10 * torch.log10(ref / err)).median().item()
        row = {"cell": cell, "schedule": schedule, "variant": variant, "samples": args.samples, "seed0": args.seed0,
               "psnr": round(metrics.psnr(full, images), 3), "library": round(metrics.psnr(full, lib), 3),
               "median_gain": round(gain, 3), "share_better": round(float((err < ref).float().mean()), 3),
               "sample_psnr": [round(float(x), 2) for x in 10 * torch.log10(4.0 / err)]}
        print(f"  {variant:<14} {row['psnr']:6.2f}  (median {gain:+.2f} over {args.variants[0]})", flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
