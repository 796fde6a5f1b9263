"""The study harness behind Policy.gap_correction (bench/ADAPTIVE_STUDY.md section 12): its variants, run by
patching the runtime rather than through the policy field. During a gap, A = Σ_k h_k R̂_k (what the predicted steps stepped with); at the computed
step c, the gap's integral re-estimated by interpolating the newest m nodes including c: Σ_j W_j R_j with
W_j = Σ_k h_k L_j(t_k); the computed step steps with R_c − κ (A − Σ_j W_j R_j) / h_c (the history keeps R_c).

    python bench/gap_correction_variants.py MODEL:STEPS:PRESET ... [--samples 16] [--seed0 0]
        [--configs NODES:KAPPA ...] [--weight none|sigma|sqrt] [--rows preset "stack Taylor-1"] [--only STEP ...]

``--weight sigma`` weights each predicted step by σ_c / σ_k (what the library does); ``--only`` corrects one computed
step at a time. No early-stage rule here (the library skips corrections whose older nodes lie in the early stage).
"""
import sys, argparse
from pathlib import Path
import torch
ROOT = Path(__file__).resolve().parents[1]; sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "bench"))
import tcpade_fx.runtime as RT
from benchmark import Bench
from granularity_check import variants
from tcpade_fx import Policy, metrics

ap = argparse.ArgumentParser()
ap.add_argument("cells", nargs="+")  # model:steps:preset
ap.add_argument("--samples", type=int, default=16); ap.add_argument("--seed0", type=int, default=0)
ap.add_argument("--configs", nargs="+", default=["0:0", "3:1", "3:0.5", "2:1"])  # nodes:kappa
ap.add_argument("--weight", default="none")
ap.add_argument("--only", type=int, nargs="*", default=None)
ap.add_argument("--rows", nargs="+", default=["preset", "stack Taylor-1"])
args = ap.parse_args()
torch.set_num_threads(1)
CFG = dict(kappa=0.0, nodes=3, pipe=None, scale=1.0)
gaps = {}
orig = RT.TCPadeRuntime._run

def wfun(sigma):
    return {"none": 1.0, "sigma": sigma, "sqrt": sigma ** 0.5}[args.weight]

def lagrange(nodes, t):
    out = []
    for j, tj in enumerate(nodes):
        w = 1.0
        for i, ti in enumerate(nodes):
            if i != j:
                w *= (t - ti) / (tj - ti)
        out.append(w)
    return out

def patched(self, graphs, branch, leaves, time, context, batch=1, deferred=None):
    compute, predict = graphs.compute, graphs.predict
    st = gaps.setdefault((id(self), branch.index), dict(A=None, ts=[], hs=[]))
    sig = CFG["pipe"].scheduler.sigmas.double().tolist()
    k = self._step
    scale = CFG["scale"]  # model time per sigma
    h = (sig[k + 1] - sig[k]) * scale
    tnow = sig[k] * scale if time is None else time
    def predict_rec(*a):
        r = a[-1] if not self.policy.input_gate else a[-2]
        hw = h / wfun(sig[k])
        st["A"] = hw * r.float() if st["A"] is None else st["A"].add_(r.float(), alpha=hw)
        st["ts"].append(tnow); st["hs"].append(hw)
        return predict(*a)
    def compute_corr(*lv):
        *out, residual = compute(*lv)
        A, ts, hs = st["A"], st["ts"], st["hs"]
        st.update(A=None, ts=[], hs=[])
        if A is None or CFG["kappa"] == 0 or len(branch.times) < CFG["nodes"] - 1 or (CFG.get("only") is not None and k != CFG["only"]):
            return (*out, residual)
        m = CFG["nodes"] - 1
        nodes = branch.times[-m:] + [tnow]
        vals = [branch.ring[s].float().reshape(residual.shape) for s in branch.slots[-m:]] + [residual.float()]
        W = [0.0] * len(nodes)
        for t, hk in zip(ts, hs):
            for j, l in enumerate(lagrange(nodes, t)):
                W[j] += hk * l
        interp = sum(w * v for w, v in zip(W, vals))
        corrected = residual.float() - CFG["kappa"] * wfun(sig[k]) * (A - interp) / h
        o = predict(*lv, corrected.to(residual.dtype))
        o = list(o) if isinstance(o, (tuple, list)) else [o]
        return (*o, residual)
    graphs.compute, graphs.predict = compute_corr, predict_rec
    try:
        return orig(self, graphs, branch, leaves, time, context, batch, deferred)
    finally:
        graphs.compute, graphs.predict = compute, predict

RT.TCPadeRuntime._run = patched
for cell in args.cells:
    model, steps, preset = cell.split(":"); steps = int(steps)
    CFG["scale"] = 1.0 if model == "mnist-flux" else 1000.0
    bench = Bench(model, args.samples, timing_samples=0, repeats=0, batch=args.samples)
    seeds = list(range(args.seed0, args.seed0 + args.samples))
    given = bench.given(seeds)
    full = bench.sample(bench.pipe(bench.euler()), steps, **given)
    pol = dict(variants(preset)); pol["preset"] = Policy.preset(preset)
    line = []
    if args.only:
        for c in args.only:
            CFG["only"] = c; n, kappa = args.configs[0].split(":"); CFG.update(nodes=int(n), kappa=float(kappa)); gaps.clear()
            pipe = bench.pipe(bench.euler(), pol[args.rows[0]]); CFG["pipe"] = pipe
            out = bench.sample(pipe, steps, **given)
            line.append(f"only {c}: {metrics.psnr(full, out):.2f}")
        print(cell, "; ".join(line), flush=True)
        continue
    for row in args.rows:
        vals = []
        for c in args.configs:
            n, kappa = c.split(":"); CFG.update(nodes=int(n), kappa=float(kappa)); gaps.clear()
            pipe = bench.pipe(bench.euler(), pol[row]); CFG["pipe"] = pipe
            out = bench.sample(pipe, steps, **given)
            vals.append(f"{metrics.psnr(full, out):.2f}")
        line.append(f"{row}: " + "/".join(vals))
    print(f"{cell} seeds {seeds[0]}.. nodes:κ={args.configs}: " + "; ".join(line), flush=True)
