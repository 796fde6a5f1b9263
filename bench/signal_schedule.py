"""Issue 13 part 2, second half: let a free error signal move the compute, at the plan's budget
(bench/ADAPTIVE_STUDY.md section 10).

    python bench/signal_schedule.py [--models mnist-dit mnist-dit-heldout mnist-wan] [--steps 20 28 50]
                                    [--samples 16] [--kappa 0.5 1 2] [--rules ...] [--out FILE]
    python bench/signal_schedule.py --per-sample          # per-sample compute (``rows-*`` rules below)
    python bench/signal_schedule.py --predictors taylor1 taylor2 input-time input-time-clip input-affine
                                                          # the step's known input informs the prediction

bench/signal_study.py found a signal that costs no model work and ranks the steps of a trajectory about as well as
the first-block probe: the relative error of the same extrapolation applied to the block stack's *input* (the
head's output, which every step computes anyway). This harness lets it decide, on the model's own trajectory
(closed loop, not teacher-forced), which steps compute, with the preset's budget exactly:

* ``plan``: the preset's own schedule (the decisions of a real ``tcpade_fx.compile`` run of the preset), replayed;
* ``signal κ``: the plan's warm-up and last step; between them a step computes when the input signal s(t)
  (the batch mean of the per-row ‖x(t) − x̂(t)‖ / ‖x(t)‖, x̂ the extrapolation of the inputs at the computed steps)
  exceeds τ·exp(κ·(C − P)), where τ is the signal's level at the computations so far (geometric mean of the newest
  three), C the computations so far and P the plan's up to this step: the plan sets the pace, the signal the timing.
  The budget is kept: no computation once the plan's count is spent, every remaining step computed when the
  remaining budget equals them, and the policy's ``mid_max_skip`` / ``late_max_skip`` hold.
* ``signal-mono κ``: the same with the plan's own constraint that the gaps between computations never shrink
  (a computation that would end a shorter gap than the one before it waits);
* ``gap κ`` / ``gap-mono κ``: the same rules on the distance from the newest node over the nodes' span (the trivial signal), to show
  what the input signal adds over the spacing the plan already encodes.

With ``--per-sample`` the plan loses one computation (the library's plan at budget − 1/N) and its rows go to
single samples at predicted steps: ``rows-signal`` picks the samples with the largest input signal, ``rows-random``
picks by chance; the picked samples run the blocks on a sub-batch and step with their true residual (the
batch-synchronous history is not changed). With ``--predictors`` the plan's schedule is kept and the residual is
predicted otherwise (:func:`input_guided`).

Unless ``--predictors`` says otherwise every row predicts with the same numerics (the newest ``history_size`` computed residuals, Padé [L/1], L = nodes − 2
up to the policy's order, no modulation), so the rows differ by the schedule only. The block stack is bypassed by
replacing the transformer's block list with one module that runs the blocks or returns input + predicted
residual; guidance branches (Wan's two calls per step) keep separate histories and decide separately. PSNR over
all samples (frames) vs the full run of the same seeds; seeds 3000.. (held out: no preset or study chose with them).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import tcpade_fx  # noqa: E402
from benchmark import sample_images  # noqa: E402
from tcpade_fx import Policy, metrics, models  # noqa: E402
from tcpade_fx.models import wan  # noqa: E402
from signal_study import predict  # noqa: E402
from tcpade_fx.pade import extrapolate, fit_modulation  # noqa: E402


def row_errors(actual: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    a, p = actual.reshape(actual.shape[0], -1).float(), predicted.reshape(actual.shape[0], -1).float()
    return torch.linalg.vector_norm(a - p, dim=1) / torch.linalg.vector_norm(a, dim=1).clamp_min(1e-30)


def time_family(ts: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The node weights over three nodes ``ts`` that keep Σ w = 1 and Σ w t_i = t: Taylor-1 on the newest two
    (``w0``), the null direction ``n`` of those two conditions, and ``lam2`` with Taylor-2 (Lagrange) = w0 + lam2 n."""
    theta = (t - ts[2]) / (ts[2] - ts[1])
    w0 = torch.tensor([0.0, -theta, 1 + theta], dtype=torch.float64)
    n = torch.linalg.svd(torch.stack([torch.ones(3, dtype=torch.float64), ts])).Vh[-1]
    lag = torch.tensor([math.prod((t - ts[j]) / (ts[i] - ts[j]) for j in range(3) if j != i) for i in range(3)],
                       dtype=torch.float64)
    return w0, n, float((lag - w0) @ n)


def input_guided(times, residuals, inputs, x, t, variant: str, policy: Policy,
                 prior: torch.Tensor | None = None) -> torch.Tensor:
    """Predict the residual as Σ w_i R_i over the newest three nodes with per-row weights that reproduce the step's
    own stack input x (known on a predicted step: the head ran) as well as the nodes allow: to first order
    R(x, t) ≈ R_0 + J (x − x_0) + g (t − t_0), so weights with Σ w = 1, Σ w t_i = t and Σ w x_i = x reproduce R.

    ``input-time``: Σ w = 1 and Σ w t_i = t exactly (a one-parameter family containing Taylor-1 on the newest two
    nodes and Taylor-2 on all three), the parameter fitted per row to the input; ``input-time-clip``: the same,
    the parameter kept between Taylor-1's and Taylor-2's; ``input-affine``: Σ w = 1 only, both free parameters fitted;
    ``input-gated``: ``prior`` (Padé where None) moved toward input-time-clip by the share of the input the fit
    explains; ``pade-input`` / ``-clip``: Padé corrected along the null direction by the input's own Padé miss."""
    ts = torch.tensor(times[-3:], dtype=torch.float64)
    X = torch.stack([v.reshape(v.shape[0], -1).double() for v in inputs[-3:]])  # (3, rows, F)
    R = torch.stack([v.reshape(v.shape[0], -1).double() for v in residuals[-3:]])
    xr = x.reshape(x.shape[0], -1).double()
    if variant.startswith("pade-input"):
        # Padé's prediction, corrected along the one direction of node weights that keeps Σ w and Σ w t (the null
        # direction n) by as much as the input's own Padé prediction misses the step's known input along it
        pade_r = predict(times, residuals, t, policy).reshape(R.shape[1:]).double()
        pade_x = predict(times, inputs, t, policy).reshape(X.shape[1:]).double()
        _, n, lam2 = time_family(ts, t)
        dirn = torch.einsum("k,krf->rf", n, X)
        lam = ((xr - pade_x) * dirn).sum(1) / (dirn * dirn).sum(1).clamp_min(1e-30)
        if variant == "pade-input-clip":
            lam = lam.clamp(-abs(lam2), abs(lam2))  # the distance from Taylor-1 to Taylor-2 along n
        out = pade_r + lam[:, None] * torch.einsum("k,krf->rf", n, R)
        return out.reshape(residuals[-1].shape).float()
    if variant == "input-affine":
        # w = e3 + a (e1 − e3) + b (e2 − e3): least squares in (a, b) per row
        D = torch.stack([X[0] - X[2], X[1] - X[2]], dim=-1)  # (rows, F, 2)
        y = (xr - X[2]).unsqueeze(-1)
        ab = torch.linalg.lstsq(D, y).solution.squeeze(-1)  # (rows, 2)
        w = torch.stack([ab[:, 0], ab[:, 1], 1 - ab[:, 0] - ab[:, 1]], dim=0)  # (3, rows)
    else:
        w0, n, lam2 = time_family(ts, t)
        base = torch.einsum("k,krf->rf", w0, X) - xr
        dirn = torch.einsum("k,krf->rf", n, X)
        lam = -(base * dirn).sum(1) / (dirn * dirn).sum(1).clamp_min(1e-30)
        if variant in ("input-time-clip", "input-gated"):
            lam = lam.clamp(min(0.0, lam2), max(0.0, lam2))
        w = w0[:, None] + n[:, None] * lam[None, :]
        if variant == "input-gated":
            # trust the fit as far as it explains the input: the share of the input's miss by Taylor-1 that the
            # fitted weights remove (the first-order argument holds only where Σ w x_i ≈ x); Padé for the rest
            miss0 = (base * base).sum(1)
            fitted = base + lam[:, None] * dirn
            share = (1 - (fitted * fitted).sum(1) / miss0.clamp_min(1e-30)).clamp(0, 1)
            if prior is None:
                prior = predict(times, residuals, t, policy)
            pade_r = prior.reshape(R.shape[1:]).double()
            guided = torch.einsum("kr,krf->rf", w, R)
            out = pade_r + share[:, None] * (guided - pade_r)
            return out.reshape(residuals[-1].shape).float()
    return torch.einsum("kr,krf->rf", w, R).reshape(residuals[-1].shape).float()


class BranchState:
    def __init__(self):
        self.times: list[float] = []
        self.residuals: list[torch.Tensor] = []
        self.inputs: list[torch.Tensor] = []
        self.levels: list[float] = []  # the signal at the computations (from the first one with history)
        self.computed = 0
        self.run = 0
        self.schedule = ""
        self.last_gap = 0  # steps between the two newest computations
        self.predicted = 0
        self.mu: torch.Tensor | float = 1.0  # pade-mod predictors: the modulation, one per row
        self.extra: dict[int, int] = {}  # per-sample compute (rows rules): sample -> extra row computations


class StackBypass(torch.nn.Module):
    """Stands in for the transformer's block list: one call per transformer call, computes or predicts."""

    def __init__(self, blocks, rule: str, plan: str, policy: Policy, kappa: float):
        super().__init__()
        self.blocks = blocks
        self.rule, self.plan, self.policy, self.kappa = rule, plan, policy, kappa
        self.branches: dict[int, BranchState] = {}
        self.calls_per_step = 1
        self.group_size = 1  # rows per sample in one call (2 where both guidance branches share the call)
        self.predictor = "pade"  # what predicts the residual (``input*``: weights fitted to the known input)
        self.row_budget = 0  # rows rules: samples computed on predicted steps, per branch, in all
        self.call = 0
        self.time = 0.0

    def __getattr__(self, name):  # DiT's tail reads transformer_blocks[0].norm1.emb
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["blocks"][0], name)

    def _nodes(self, b: BranchState):
        k = self.policy.history_size
        return b.times[-k:], b.residuals[-k:], b.inputs[-k:]

    def _extrapolate(self, times, values, t):
        return predict(times, values, t, self.policy)

    def _pade_and_taylor(self, times, residuals, t):
        return predict(times, residuals, t, self.policy), predict(times, residuals, t, self.policy, method="taylor")

    def _modulated(self, b: BranchState, times, residuals, t):
        """The runtime's modulated prediction T + μ (P − T), μ per row (Policy.modulate_denominator)."""
        pade, taylor = self._pade_and_taylor(times, residuals, t)
        mu = b.mu if isinstance(b.mu, torch.Tensor) else torch.full((pade.shape[0],), float(b.mu))
        return taylor + mu.reshape(-1, *[1] * (pade.dim() - 1)) * (pade - taylor)

    def _fit_modulation(self, b: BranchState, actual: torch.Tensor, t: float) -> None:
        times, residuals, _ = self._nodes(b)
        pade, taylor = self._pade_and_taylor(times, residuals, t)
        fitted = fit_modulation(actual, pade, taylor, per_sample=True, default=b.mu)
        a = self.policy.modulation_smoothing
        b.mu = a * fitted + (1 - a) * b.mu

    def _signal(self, b: BranchState, x: torch.Tensor, t: float) -> float:
        times, _, inputs = self._nodes(b)
        if self.rule.startswith("gap"):
            return abs(t - times[-1]) / max(abs(times[-1] - times[0]), 1e-12)
        return float(row_errors(x, self._extrapolate(times, inputs, t)).mean())

    def _decide(self, b: BranchState, step: int, x: torch.Tensor, t: float) -> tuple[bool, float | None]:
        n, plan = len(self.plan), self.plan
        warmup = len(plan) - len(plan.lstrip("C"))
        planned = plan[step] == "C"
        steers = self.rule.startswith(("signal", "gap"))
        if not steers or step < warmup or step == n - 1 or len(b.times) < 2:
            return planned, (self._signal(b, x, t) if steers and len(b.times) >= 2 else None)
        s = self._signal(b, x, t)
        budget_left = plan.count("C") - b.computed - 1  # the last step is reserved
        remaining = n - 1 - step
        stage_late = step / (n - 1) >= self.policy.late_start
        max_skip = self.policy.late_max_skip if stage_late else self.policy.mid_max_skip
        if budget_left <= 0:
            return False, s
        if budget_left >= remaining or b.run >= max_skip:
            return True, s
        if not b.levels:
            return planned, s
        if self.rule.endswith("-mono") and b.run + 1 < b.last_gap:
            return False, s  # the gaps may not shrink (the plan's rule, controller._replan)
        level = math.exp(sum(math.log(max(v, 1e-30)) for v in b.levels[-3:]) / len(b.levels[-3:]))
        behind = b.computed - plan[:step].count("C")
        return s > level * math.exp(self.kappa * behind), s

    def forward(self, hidden_states, *args, **kwargs):
        branch = self.call % self.calls_per_step
        step = self.call // self.calls_per_step
        self.call += 1
        b = self.branches.setdefault(branch, BranchState())
        t = self.time
        compute, s = self._decide(b, step, hidden_states, t)
        if compute:
            out = hidden_states
            for block in self.blocks:
                out = block(out, *args, **kwargs)
            residual = (out - hidden_states).detach().float()
            if self.predictor.startswith("pade-mod") and len(b.times) >= 2:
                self._fit_modulation(b, residual, t)
            k = self.policy.history_size
            b.times, b.residuals = (b.times + [t])[-k:], (b.residuals + [residual])[-k:]
            b.inputs = (b.inputs + [hidden_states.detach().float()])[-k:]
            b.computed += 1
            b.last_gap = b.run + 1
            b.run = 0
            if s is not None:
                b.levels.append(s)
            b.schedule += "C"
            return out
        times, residuals, _ = self._nodes(b)
        b.run += 1
        b.schedule += "."
        if self.predictor.startswith("pade-mod"):
            predicted = self._modulated(b, times, residuals, t)
            if self.predictor == "pade-mod-gated" and len(times) >= 3:
                predicted = input_guided(times, residuals, self._nodes(b)[2], hidden_states.float(), t,
                                         "input-gated", self.policy, prior=predicted)
        elif self.predictor.startswith(("input", "pade-input")) and len(times) >= 3:
            predicted = input_guided(times, residuals, self._nodes(b)[2], hidden_states.float(), t, self.predictor,
                                     self.policy)
        elif self.predictor == "taylor1":
            predicted = extrapolate(times[-2:], residuals[-2:], t, method="taylor", order=1)
        elif self.predictor == "taylor2" and len(times) >= 3:
            predicted = extrapolate(times[-3:], residuals[-3:], t, method="taylor", order=2)
        else:
            predicted = self._extrapolate(times, residuals, t)
        out = hidden_states + predicted.to(hidden_states.dtype)
        if self.rule.startswith("rows"):
            out = self._compute_rows(b, step, hidden_states, out, args, kwargs)
        return out

    def _compute_rows(self, b: BranchState, step: int, x, out, args, kwargs):
        """Per-sample compute: on a predicted step, the samples the rule picks run the blocks on a sub-batch and
        step with their true residual (the history, batch-synchronous, is not changed). ``row_budget`` samples per
        branch in all, spread evenly over the plan's predicted steps."""
        predicted_steps = self.plan.count(".")
        j = b.predicted
        b.predicted += 1
        allowed = (j + 1) * self.row_budget // predicted_steps - j * self.row_budget // predicted_steps
        if allowed <= 0:
            return out
        rows = x.shape[0]
        samples = rows // self.group_size
        groups = [[g + k * samples for k in range(self.group_size)] for g in range(samples)]
        if self.rule == "rows-signal":
            times, _, inputs = self._nodes(b)
            err = row_errors(x, self._extrapolate(times, inputs, self.time))
            score = torch.stack([err[g].mean() for g in groups])
        else:
            score = torch.rand(samples, generator=torch.Generator().manual_seed(1000 * step + len(b.schedule)))
        chosen = torch.topk(score, min(allowed, samples)).indices.tolist()
        idx = torch.tensor([r for g in chosen for r in groups[g]])

        def take(v):
            return v[idx] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows else v

        sub = x[idx]
        sub_args = [take(a) for a in args]
        sub_kwargs = {k: take(v) for k, v in kwargs.items()}
        for block in self.blocks:
            sub = block(sub, *sub_args, **sub_kwargs)
        out = out.clone()
        out[idx] = sub
        for g in chosen:
            b.extra[g] = b.extra.get(g, 0) + 1
        return out


def install(pipe, rule: str, plan: str, policy: Policy, kappa: float, row_budget: int = 0,
            predictor: str = "pade") -> StackBypass:
    transformer = pipe.transformer
    name = "blocks" if hasattr(transformer, "blocks") else "transformer_blocks"
    blocks = getattr(transformer, name)
    bypass = StackBypass(blocks, rule, plan, policy, kappa)
    bypass.calls_per_step = 2 if name == "blocks" else 1  # Wan's guidance: two calls per step
    bypass.group_size = 1 if name == "blocks" else 2  # the image pipelines batch cond and uncond rows
    bypass.row_budget = row_budget
    bypass.predictor = predictor

    def read_time(module, args, kwargs):
        bypass.time = float(kwargs["timestep"].reshape(-1)[0])

    transformer.register_forward_pre_hook(read_time, with_kwargs=True)
    setattr(transformer, name, torch.nn.ModuleList([bypass]))
    return bypass


def seeded_inputs(model: str, seeds: list[int]) -> tuple[list[int], torch.Tensor]:
    labels = [s % 10 for s in seeds]
    if model == "mnist-wan":
        return labels, metrics.seeded_latents(seeds, shape=(1, wan.NUM_FRAMES, 28, 28))
    return labels, metrics.seeded_latents(seeds)


def run(model: str, labels, latents, steps: int, setup=None) -> torch.Tensor:
    pipe = models.load(model)
    if setup is not None:
        setup(pipe)
    with torch.no_grad():
        if model == "mnist-wan":
            return pipe(labels, num_inference_steps=steps, latents=latents, guidance_scale=wan.DEFAULT_GUIDANCE,
                        output_type="pt").frames
        return sample_images(pipe, labels, latents, steps)


def preset_plan(model: str, labels, latents, steps: int, preset: str | Policy) -> tuple[str, Policy]:
    pipe = models.load(model)
    tcpade_fx.compile(pipe, policy=preset)
    with torch.no_grad():
        if model == "mnist-wan":
            pipe(labels[:1], num_inference_steps=steps, latents=latents[:1], guidance_scale=wan.DEFAULT_GUIDANCE,
                 output_type="pt")
        else:
            sample_images(pipe, labels[:1], latents[:1], steps)
    return pipe.tcpade.stats.decisions(0), pipe.tcpade.policy


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(metrics.psnr(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mnist-dit", "mnist-dit-heldout", "mnist-wan"])
    ap.add_argument("--steps", nargs="+", type=int, default=[20, 28, 50])
    ap.add_argument("--presets", nargs="+", default=["balanced"])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seed0", type=int, default=3000, help="first seed (3000: the seeds every table was made on)")
    ap.add_argument("--kappa", nargs="+", type=float, default=[0.5, 1.0, 2.0])
    ap.add_argument("--per-sample", action="store_true",
                    help="per-sample compute: one plan computation fewer, its rows spent on the samples the input "
                         "signal (or chance) picks at predicted steps")
    ap.add_argument("--predictors", nargs="+", default=None,
                    help="on the plan's schedule, predict with these instead of the rules: taylor1, taylor2, "
                         "input-time, input-time-clip, input-affine (weights fitted to the step's known input), "
                         "pade-input, pade-input-clip (Padé corrected by the input's miss), input-gated (Padé moved towards "
                         "input-time-clip as far as the fit explains the input), pade-mod (the runtime's modulated "
                         "Padé), pade-mod-gated (the same gate on it)")
    ap.add_argument("--rules", nargs="+", default=["signal", "gap", "signal-mono", "gap-mono"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "signal-schedule.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = list(range(args.seed0, args.seed0 + args.samples))
    for model, steps, preset in itertools.product(args.models, args.steps, args.presets):
        labels, latents = seeded_inputs(model, seeds)
        full = run(model, labels, latents, steps)
        plan, policy = preset_plan(model, labels, latents, steps, preset)
        rows = [("plan", 0.0, plan)]
        if args.predictors:
            rows += [(f"plan, {name}", 0.0, plan) for name in args.predictors]
        elif args.per_sample:
            # one computation fewer in the plan, its rows spent on the samples a rule picks at predicted steps
            fewer = Policy.preset(preset).replace(compute_budget=(plan.count("C") - 1) / steps)
            reduced, _ = preset_plan(model, labels, latents, steps, fewer)
            rows += [("plan", 0.0, reduced), ("rows-signal", 0.0, reduced), ("rows-random", 0.0, reduced)]
        else:
            rows += [(r, k, plan) for r in args.rules for k in args.kappa]
        for rule, kappa, mask in rows:
            holder = {}
            budget = args.samples if rule.startswith("rows") else 0
            predictor = rule.split(", ")[1] if ", " in rule else "pade"
            base_rule = rule.split(", ")[0]
            out = run(model, labels, latents, steps, setup=lambda p: holder.setdefault(
                "b", install(p, base_rule, mask, policy, kappa, budget, predictor)))
            bypass = holder["b"]
            branches = [bypass.branches[k] for k in sorted(bypass.branches)]
            schedules = [b.schedule for b in branches]
            extra = sum(sum(b.extra.values()) for b in branches) / args.samples  # in whole-batch computations
            computed = (sum(s.count("C") for s in schedules) + extra) / sum(len(s) for s in schedules)
            per_sample = [sum(b.extra.get(g, 0) for b in branches) for g in range(args.samples)]
            record = dict(model=model, steps=steps, preset=preset, rule=rule, kappa=kappa, samples=args.samples,
                          plan=mask, schedules=schedules, compute=computed, psnr=psnr(out, full),
                          per_sample_psnr=[psnr(out[i:i + 1], full[i:i + 1]) for i in range(args.samples)],
                          extra_computes_per_sample=per_sample)
            print(json.dumps(record), flush=True)
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
