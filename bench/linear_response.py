"""Why does one extrapolant's cached run end closer to the full run than another's whose one-step errors are smaller?
Record each predicted step's error e_k = R̂_k − R_k in the cached run (closed loop: the stack is also computed at the
run's own state), then inject each e_k alone into the full run's block-stack residual at step k and keep the final
sample's change Δ_k (bench/ADAPTIVE_STUDY.md section 12).

    python bench/linear_response.py MODEL STEPS PRESET [--samples 16] [--seed0 0] [--rows preset "stack Taylor-2"]
                                    [--save FILE.pt]

Prints per step ‖e_k‖/‖R_k‖ and the final PSNR cost of Δ_k alone; then the linearity check
(Σ Δ_k against the cached run's actual final error) and the coherence ‖Σ Δ_k‖² / Σ ‖Δ_k‖²."""
import sys, argparse
from pathlib import Path
import torch
ROOT = Path(__file__).resolve().parents[1]; sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "bench"))
import tcpade_fx.runtime as RT
from benchmark import Bench
from peers import blocks_of
from granularity_check import variants
from tcpade_fx import Policy, metrics

ap = argparse.ArgumentParser()
ap.add_argument("model"); ap.add_argument("steps", type=int); ap.add_argument("preset")
ap.add_argument("--samples", type=int, default=16); ap.add_argument("--seed0", type=int, default=0)
ap.add_argument("--rows", nargs="+", default=["preset", "stack Taylor-2"])
ap.add_argument("--save", default=None)
args = ap.parse_args()
torch.set_num_threads(1)
bench = Bench(args.model, args.samples, timing_samples=0, repeats=0, batch=args.samples)
seeds = list(range(args.seed0, args.seed0 + args.samples))
given = bench.given(seeds)
pipe = bench.pipe(bench.euler())
tr = pipe.transformer
blocks = blocks_of(tr)
state = dict(call=-1, inject=None)
def pre(mod, a, kw):
    state["call"] += 1
def post(mod, a, kw, out):
    e = state["inject"].get(state["call"]) if state["inject"] else None
    if e is None:
        return out
    hid = out[1] if isinstance(out, tuple) else out
    hid = hid + e.reshape(hid.shape).to(hid.dtype)
    return (out[0], hid) if isinstance(out, tuple) else hid
blocks[0].register_forward_pre_hook(pre, with_kwargs=True)
blocks[-1].register_forward_hook(post, with_kwargs=True)
def run(inject=None):
    state.update(call=-1, inject=inject)
    return bench.sample(pipe, args.steps, **given)
full = run()

errors = {}
orig = RT.TCPadeRuntime._run
def shadowed_run(self, graphs, branch, leaves, time, context, batch=1, deferred=None):
    compute, predict = graphs.compute, graphs.predict
    def predict_and_record(*leaves_and_residual):
        *call, residual = leaves_and_residual
        actual = compute(*call)[-1]
        errors[self._step] = ((residual.float() - actual.float()).clone(), actual.float().clone())
        return predict(*leaves_and_residual)
    graphs.predict = predict_and_record
    try:
        return orig(self, graphs, branch, leaves, time, context, batch, deferred)
    finally:
        graphs.predict = predict

policies = dict(variants(args.preset)); policies["preset"] = Policy.preset(args.preset)
print(f"{args.model} {args.steps} {args.preset}, seeds {seeds[0]}..{seeds[-1]}", flush=True)
saved = {}
for name in args.rows:
    errors.clear()
    RT.TCPadeRuntime._run = shadowed_run
    try:
        cached = bench.sample(bench.pipe(bench.euler(), policies[name]), args.steps, **given)
    finally:
        RT.TCPadeRuntime._run = orig
    actual = cached - full
    deltas, lines = [], []
    for k in sorted(errors):
        e, r = errors[k]
        out = run({k: e})
        d = out - full
        deltas.append(d)
        rel = float((e.reshape(e.shape[0], -1).norm(dim=1) / r.reshape(r.shape[0], -1).norm(dim=1)).mean())
        lines.append(f"{k}:{rel:.3f}/{metrics.psnr(full, out):.1f}")
    total = sum(deltas)
    coh = float(total.pow(2).sum() / sum(d.pow(2).sum() for d in deltas))
    lin = float((total - actual).norm() / actual.norm())
    cos = float((total * actual).sum() / (total.norm() * actual.norm()))
    print(f"{name:16s} cached {metrics.psnr(full, cached):6.2f} dB; sum of responses {metrics.psnr(full, full + total):6.2f} dB "
          f"(cos with actual {cos:.2f}, rel. diff {lin:.2f}); coherence ‖ΣΔ‖²/Σ‖Δ‖² {coh:.2f}; "
          f"sum of single costs (energy) {metrics.psnr(full, full + torch.stack(deltas).pow(2).sum(0).sqrt()):6.2f} dB", flush=True)
    print("   step:rel.err/PSNR alone  " + " ".join(lines), flush=True)
    if args.save:
        saved[name] = dict(steps=sorted(errors), deltas=torch.stack(deltas), actual=actual,
                           errors=torch.stack([errors[k][0] for k in sorted(errors)]),
                           residuals=torch.stack([errors[k][1] for k in sorted(errors)]))
        torch.save(saved, args.save)
