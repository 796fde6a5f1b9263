"""Which of a preset's gap corrections pay (Policy.gap_correction, bench/ADAPTIVE_STUDY.md section 13): runs a cell
with the correction off, on as shipped, and restricted by a rule on the gap, through ``tcpade_fx.compile`` with the
runtime's ``_gap_miss`` wrapped (a study harness: the rules are not policy fields).

    python bench/gap_span_study.py MODEL:STEPS:PRESET[:GUIDANCE[:SHIFT]] ... [--samples 32] [--seed0 4000]
        [--rules off on only:13 skip:19 ratio:1 ...]

A rule is tokens joined by ``+``: ``off`` (κ = 0), ``on`` (κ = 1, as the library does), ``kappa:K`` (κ = K),
``only:S,S`` (correct only at these computed steps), ``skip:S,S``, ``ratio:R`` (correct only where the gap's span in
σ over σ_c is at most R), ``span:S`` (only where the span in σ is at most S), ``q:Q`` (only where span²/σ_c is at most Q), ``warp:W`` (the policy's budget_warp),
``budget:B`` (its compute_budget), ``late:L`` (its late_start), ``limit:L`` (its gap_span_limit; ``limit:inf``
corrects every gap, as before it existed), ``mask:C..C.`` (an explicit schedule), ``nodes:N`` (the interpolant's node count, the library's GAP_NODES); ``contract`` (the miss scaled by σ_{c+1}/σ_c: the share of an error off the data that the computed step's own
step leaves); ``last`` (the trajectory's last step is corrected
whatever the other tokens say), ``nolast`` (it is not).
Prints PSNR vs the full Euler run, the median per-sample gain over ``off`` and the corrections made (step, the gap's span in σ).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "bench"))
import tcpade_fx.runtime as RT  # noqa: E402
from benchmark import Bench  # noqa: E402
from extrapolant_check import per_sample_mse  # noqa: E402
from tcpade_fx import Policy, metrics  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("cells", nargs="+")
ap.add_argument("--samples", type=int, default=32)
ap.add_argument("--seed0", type=int, default=4000)
ap.add_argument("--rules", nargs="+", default=["off", "on"])
ap.add_argument("--out", type=Path, default=None)
args = ap.parse_args()
torch.set_num_threads(1)

RULE = {"rule": "on"}
LOG: list = []
orig = RT.TCPadeRuntime._gap_miss


def allowed(rule: str, step: int, ratio: float, span: float, last: bool) -> bool:
    tokens = rule.split("+")
    if last and "last" in tokens:
        return True
    if last and "nolast" in tokens:
        return False
    ok = True
    for token in tokens:
        kind, _, arg = token.partition(":")
        if kind == "only":
            ok &= step in {int(s) for s in arg.split(",")}
        elif kind == "skip":
            ok &= step not in {int(s) for s in arg.split(",")}
        elif kind == "ratio":
            ok &= ratio <= float(arg)
        elif kind == "span":
            ok &= span <= float(arg)
        elif kind == "q":
            ok &= span * ratio <= float(arg)
    return ok


def policy_for(preset: str, rule: str) -> Policy:
    changes = {"gap_correction": 1.0}
    names = {"warp": "budget_warp", "budget": "compute_budget", "late": "late_start", "limit": "gap_span_limit"}
    for token in rule.split("+"):
        kind, _, arg = token.partition(":")
        if kind == "off":
            changes["gap_correction"] = 0.0
        elif kind == "kappa":
            changes["gap_correction"] = float(arg)
        elif kind in names:
            changes[names[kind]] = float(arg)
        elif kind == "mask":
            changes.update(schedule="explicit", mask=arg)
    return Policy.preset(preset).replace(**changes)


def patched(self, branch, step, time, residual):
    sig = self._euler_sigmas
    start = branch.steps[-1] if branch.steps else None
    miss = orig(self, branch, step, time, residual)
    if miss is None or start is None:
        return miss
    span = sig[start] - sig[step]
    ratio = span / sig[step]
    ok = allowed(RULE["rule"], step, ratio, span, step == self._num_steps - 1)
    LOG.append((step, round(span, 3), round(ratio, 2), ok))
    if ok and "contract" in RULE["rule"].split("+"):
        miss = miss * (sig[step + 1] / sig[step])  # what the computed step's own Euler step leaves of an error off the data
    return miss if ok else None


RT.TCPadeRuntime._gap_miss = patched
GAP_NODES = RT.GAP_NODES
for cell in args.cells:
    model, n, preset, *more = cell.split(":")
    n = int(n)
    # MODEL:STEPS:PRESET:GUIDANCE[:SHIFT] samples this cell, full run included, at another guidance scale / time shift
    shift = float(more[1]) if len(more) > 1 else None
    bench = Bench(model, args.samples, timing_samples=0, repeats=0, batch=16, shift=shift)
    if more:
        bench.guidance = float(more[0])
    seeds = list(range(args.seed0, args.seed0 + args.samples))
    given = bench.given(seeds)
    full = bench.sample(bench.pipe(bench.euler()), n, **given)
    base = None
    for rule in args.rules:
        RULE["rule"] = rule
        policy = policy_for(preset, rule)
        nodes = [int(t.split(":")[1]) for t in rule.split("+") if t.startswith("nodes:")]
        RT.GAP_NODES = nodes[0] if nodes else GAP_NODES
        LOG.clear()
        out = bench.sample(bench.pipe(bench.euler(), policy), n, **given)
        if base is None:
            base = out
        gain = 10 * torch.log10(per_sample_mse(full, base) / per_sample_mse(full, out))
        made = sorted({(s, sp, r) for s, sp, r, ok in LOG if ok})
        row = dict(model=model, steps=n, preset=preset, guidance=bench.guidance, shift=bench.shift, rule=rule, samples=args.samples, seed0=args.seed0,
                   psnr=round(metrics.psnr(full, out), 2), median_gain=round(float(gain.median()), 2),
                   share_better=round(float((gain > 0).float().mean()), 2), schedule=bench.schedules[0],
                   corrections=made)
        print(json.dumps(row, ensure_ascii=False), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
