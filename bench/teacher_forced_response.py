"""Teacher-forced version of linear_response.py: the extrapolants' errors with nodes from the full run itself (no
feedback from a drifted state), injected one at a time into the full run; coherence of the final responses
(bench/ADAPTIVE_STUDY.md section 12).

    python bench/teacher_forced_response.py MODEL STEPS SCHEDULE [--samples 16] [--seed0 0]

SCHEDULE: one character per step, C computed, . predicted (e.g. a preset's schedule from
bench/results/granularity-check.jsonl)."""
import sys, argparse
from pathlib import Path
import torch
ROOT = Path(__file__).resolve().parents[1]; sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "bench"))
from benchmark import Bench
from peers import blocks_of
from tcpade_fx import metrics, pade

ap = argparse.ArgumentParser()
ap.add_argument("model"); ap.add_argument("steps", type=int); ap.add_argument("schedule")
ap.add_argument("--samples", type=int, default=16); ap.add_argument("--seed0", type=int, default=0)
args = ap.parse_args()
torch.set_num_threads(1)
bench = Bench(args.model, args.samples, timing_samples=0, repeats=0, batch=args.samples)
seeds = list(range(args.seed0, args.seed0 + args.samples))
given = bench.given(seeds)
pipe = bench.pipe(bench.euler())
tr = pipe.transformer
blocks = blocks_of(tr)
state = dict(call=-1, inject=None, rec=None)
times, res = {}, {}
def tpre(mod, a, kw):
    state["call"] += 1
    if state["rec"]:
        times[state["call"]] = float(kw["timestep"].reshape(-1)[0])
def pre(mod, a, kw):
    state["inp"] = kw.get("hidden_states", a[0] if a else None)
def post(mod, a, kw, out):
    hid = out[1] if isinstance(out, tuple) else out
    if state["rec"]:
        res[state["call"]] = (hid - state["inp"]).float().clone()
    e = state["inject"].get(state["call"]) if state["inject"] else None
    if e is None:
        return out
    hid = hid + e.reshape(hid.shape).to(hid.dtype)
    return (out[0], hid) if isinstance(out, tuple) else hid
tr.register_forward_pre_hook(tpre, with_kwargs=True)
blocks[0].register_forward_pre_hook(pre, with_kwargs=True)
blocks[-1].register_forward_hook(post, with_kwargs=True)
def run(inject=None, rec=False):
    state.update(call=-1, inject=inject, rec=rec)
    return bench.sample(pipe, args.steps, **given)
full = run(rec=True)
computed = [i for i, c in enumerate(args.schedule) if c == "C"]
print(f"{args.model} {args.steps} teacher-forced on {args.schedule}", flush=True)
for name, method, order in [("Taylor-1", "taylor", 1), ("Taylor-2", "taylor", 2), ("Padé [1/1]", "pade", 1)]:
    deltas, errs = [], []
    for k, c in enumerate(args.schedule):
        if c == "C":
            continue
        nodes = [j for j in computed if j < k][-(order + 1 if method == "taylor" else order + 2):]
        pred = pade.extrapolate([times[j] for j in nodes], [res[j] for j in nodes], times[k], method=method, order=order)
        e = pred - res[k]
        errs.append(float((e.reshape(e.shape[0], -1).norm(dim=1) / res[k].reshape(e.shape[0], -1).norm(dim=1)).mean()))
        deltas.append(run({k: e}) - full)
    total = sum(deltas)
    coh = float(total.pow(2).sum() / sum(d.pow(2).sum() for d in deltas))
    print(f"{name:11s} sum of responses {metrics.psnr(full, full + total):6.2f} dB; coherence {coh:.2f}; energy sum "
          f"{metrics.psnr(full, full + torch.stack(deltas).pow(2).sum(0).sqrt()):6.2f} dB; mean rel. err {sum(errs)/len(errs):.4f}", flush=True)
