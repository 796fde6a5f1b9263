"""Per-step prediction errors of Padé [1/1], Taylor-1 and Padé with one denominator shared by the two guidance
branches, on mnist-wan along one trajectory, next to the final PSNR each gives: does a step-local error say which
extrapolant ends better? (The modulation μ and the error checks of the library are step-local.)

    python bench/wan_step_errors.py [--steps 50] [--seed0 200] [--samples 16] [--follow pade|taylor|shared]

A study harness, not the library: the block list is replaced by one module that runs the stack at every step (the
true residual ``r``), and on the predicted steps of balanced's schedule steps with the prediction of ``--follow``
while measuring all three against ``r``. Errors are of the guided combination ``g·r_cond + (1 − g)·r_uncond``
(g = 5): per step relative to it; "Σ|h·e|" the sum over predicted steps of the step length h times the error
norm; "|Σ h·e|" the norm of the summed errors (first-order effect on the final latents, ignoring propagation); the
same after the tail's LayerNorm (which removes errors along a token's own scale and mean), and of the output tokens
(after the whole tail: norm, time-dependent scale and shift, ``proj_out`` to the velocity's channels).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchmark import Bench  # noqa: E402
from tcpade_fx import metrics  # noqa: E402
from tcpade_fx.models import wan  # noqa: E402
from tcpade_fx.pade import denominator_partials, extrapolate, extrapolate_stacked, stack_history  # noqa: E402

KINDS = ("pade", "taylor", "shared")


def predictions(cond: list, uncond: list, t: float) -> dict[tuple[str, int], torch.Tensor]:
    times = [x for x, _ in cond]
    out = {}
    for branch, hist in enumerate((cond, uncond)):
        rs = [r for _, r in hist]
        out["pade", branch] = extrapolate(times, rs, t, method="pade", order=1)
        out["taylor", branch] = extrapolate(times[-2:], rs[-2:], t, method="taylor", order=1)
    stacks = [stack_history([r for _, r in h]) for h in (cond, uncond)]
    fit = denominator_partials(times, torch.cat(stacks, dim=2), t)
    for branch, (stacked, hist) in enumerate(zip(stacks, (cond, uncond))):
        out["shared", branch] = extrapolate_stacked(times, stacked, t, like=hist[-1][1], fit=fit)
    return out


class VelocityTail:
    """What the Wan transformer does after its blocks, up to the unpatchify: the output tokens a residual becomes
    (``norm_out`` · (1 + scale) + shift, then ``proj_out``, with the call's own time embedding, captured from
    ``condition_embedder``). The residual lives in the hidden width (128 here); the velocity in 4 channels per token."""

    def __init__(self, transformer):
        self.transformer, self.temb = transformer, None
        transformer.condition_embedder.register_forward_hook(lambda m, a, out: setattr(self, "temb", out[0]))

    def __call__(self, hidden: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        tr = self.transformer
        shift, scale = (tr.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        return tr.proj_out(tr.norm_out(hidden.float()) * (1 + scale) + shift)


class MeasuredStack(torch.nn.Module):
    def __init__(self, blocks, times: list[float], mask: str, follow: str, guidance: float, tail,
                 taylor_first: int = 0):
        super().__init__()
        self.blocks, self.times, self.mask, self.follow, self.g = blocks, times, mask, follow, guidance
        self.taylor_first = taylor_first  # the first this many predicted steps step with Taylor-1 whatever follow says
        self.tail = tail  # hidden -> the model's velocity tokens (norm_out, its shift / scale, proj_out)
        self.calls = 0
        self.history: dict[int, list] = {0: [], 1: []}
        self.seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.preds: dict | None = None
        self.steps: list[dict] = []
        self.sums = {k: {"abs": 0.0, "vec": 0.0, "ln_abs": 0.0, "ln_vec": 0.0, "out_abs": 0.0, "out_vec": 0.0}
                     for k in KINDS}

    def forward(self, hidden, encoder_hidden_states, timestep_proj, rotary_emb):
        step, branch = divmod(self.calls, 2)
        self.calls += 1
        t = self.times[step]
        x = hidden
        for block in self.blocks:
            x = block(x, encoder_hidden_states, timestep_proj, rotary_emb)
        r = x - hidden
        if self.mask[step] == "C" or len(self.history[branch]) < 3:
            self.history[branch] = [*self.history[branch], (t, r)][-3:]
            return x
        if branch == 0:
            self.preds = predictions(self.history[0], self.history[1], t)
        follow = "taylor" if len(self.steps) < self.taylor_first else self.follow  # the same for both branches
        self.seen[branch] = (hidden, r, self.tail.temb)
        if branch == 1:
            self._measure(step)
        return hidden + self.preds[follow, branch]

    def _measure(self, step: int) -> None:
        (h_c, r_c, temb_c), (h_u, r_u, temb_u) = self.seen[0], self.seen[1]
        h = self.times[step] - (self.times[step + 1] if step + 1 < len(self.times) else 0.0)
        ln = lambda v, temb: F.layer_norm(v, v.shape[-1:], eps=1e-6)  # noqa: E731
        views = {"residual": lambda v, temb: v, "ln": ln, "out": self.tail}  # what a residual is seen as
        # the true values in each view, once per step: (cond, uncond), the streams the residuals are added to
        streams = {"residual": (0.0, 0.0), "ln": (h_c, h_u), "out": (h_c, h_u)}
        truth = {name: (f(streams[name][0] + r_c, temb_c), f(streams[name][1] + r_u, temb_u))
                 for name, f in views.items()}

        def guided_error(name: str, p_c: torch.Tensor, p_u: torch.Tensor) -> torch.Tensor:
            f, (s_c, s_u), (t_c, t_u) = views[name], streams[name], truth[name]
            return self.g * (f(s_c + p_c, temb_c) - t_c) + (1 - self.g) * (f(s_u + p_u, temb_u) - t_u)

        guided = self.g * r_c + (1 - self.g) * r_u
        row = {"step": step}
        for k in KINDS:
            p_c, p_u = self.preds[k, 0], self.preds[k, 1]
            e, e_ln, e_out = (guided_error(name, p_c, p_u) for name in ("residual", "ln", "out"))
            row[k] = round(float(e.norm() / guided.norm()), 4)
            row[k + "_out"] = float(e_out.norm())
            s = self.sums[k]
            s["abs"] += h * float(e.norm())
            s["vec"] = s["vec"] + h * e
            s["ln_abs"] += h * float(e_ln.norm())
            s["ln_vec"] = s["ln_vec"] + h * e_ln
            s["out_abs"] += h * float(e_out.norm())
            s["out_vec"] = s["out_vec"] + h * e_out
        self.steps.append(row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed0", type=int, default=200)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--follow", default="taylor", choices=KINDS)
    ap.add_argument("--taylor-first", type=int, default=0, metavar="K",
                    help="step with Taylor-1 on the first K predicted steps, then with --follow (is the final ranking "
                         "decided where Padé's step errors are the larger ones, right after the warm-up?)")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    bench = Bench("mnist-wan", args.samples, timing_samples=0, repeats=0, batch=args.batch)
    seeds = list(range(args.seed0, args.seed0 + args.samples))
    given = bench.given(seeds)
    n = args.steps
    full = bench.sample(bench.pipe(bench.euler()), n, **given)
    bench.sample(bench.pipe(bench.euler(), "balanced"), n, **given)
    mask = bench.schedules[0]
    outs, stacks = [], []
    for i in range(0, args.samples, args.batch):  # one trajectory (one harness state) per batch
        pipe = bench.pipe(bench.euler())
        pipe.scheduler.set_timesteps(n)
        stack = MeasuredStack(pipe.transformer.blocks, [float(s) for s in pipe.scheduler.sigmas[:n]], mask,
                              args.follow, wan.DEFAULT_GUIDANCE, VelocityTail(pipe.transformer), args.taylor_first)
        pipe.transformer.blocks = torch.nn.ModuleList([stack])
        outs.append(bench.sample(pipe, n, given["labels"][i:i + args.batch], given["latents"][i:i + args.batch]))
        stacks.append(stack)
    out = torch.cat(outs)
    stack = stacks[0]  # the errors below: the first batch's trajectory
    sums = {k: {"sum_abs": round(s["abs"], 2), "abs_sum": round(float(s["vec"].norm()), 2),
                "ln_sum_abs": round(s["ln_abs"], 2), "ln_abs_sum": round(float(s["ln_vec"].norm()), 2),
                "out_sum_abs": round(s["out_abs"], 3), "out_abs_sum": round(float(s["out_vec"].norm()), 3),
                "steps_lower_than_taylor": sum(r[k] < r["taylor"] for r in stack.steps),
                "steps_lower_than_taylor_out": sum(r[k + "_out"] < r["taylor_out"] for r in stack.steps)}
            for k, s in stack.sums.items()}
    print(json.dumps({"steps": n, "seed0": args.seed0, "clips": args.samples, "schedule": mask, "follow": args.follow,
                      "taylor_first": args.taylor_first, "psnr": round(metrics.psnr(full, out), 2),
                      "psnr_per_batch": [round(metrics.psnr(full[i:i + args.batch], out[i:i + args.batch]), 2)
                                         for i in range(0, args.samples, args.batch)], "predicted_steps": len(stack.steps), "errors": sums}))
    for row in stack.steps:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
