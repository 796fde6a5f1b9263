"""How much a one-step error of the block stack's residual costs the final sample, by direction: along R (a
magnitude error) against orthogonal to R with the same norm (bench/ADAPTIVE_STUDY.md section 12).

    python bench/error_direction.py MODEL STEPS [--samples 16] [--eps 0.05] [--at 6 10 15 ...]

The full Euler run of seeds 1000.. (the benchmark's sampling) with, at one step, the last block's output moved by
eps·R, −eps·R or a random direction orthogonal to R (per sample, norm eps·‖R‖): PSNR vs the unperturbed run."""
import sys, argparse, statistics
from pathlib import Path
import torch
ROOT = Path(__file__).resolve().parents[1]; sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "bench"))
from benchmark import Bench
from peers import blocks_of
from tcpade_fx import metrics

ap = argparse.ArgumentParser()
ap.add_argument("model"); ap.add_argument("steps", type=int)
ap.add_argument("--samples", type=int, default=16); ap.add_argument("--eps", type=float, default=0.05)
ap.add_argument("--at", type=int, nargs="*")
args = ap.parse_args()
torch.set_num_threads(1)
bench = Bench(args.model, args.samples, timing_samples=0, repeats=0, batch=args.samples)
seeds = list(range(1000, 1000 + args.samples))
given = bench.given(seeds)
pipe = bench.pipe(bench.euler())
tr = pipe.transformer
blocks = blocks_of(tr)
state = dict(call=-1, target=None, mode=None, inp=None)

def pre(mod, a, kw):
    state["call"] += 1
    h = kw.get("hidden_states", a[0] if a else None)
    state["inp"] = h
def post(mod, a, kw, out):
    if state["call"] != state["target"]:
        return out
    hid = out[1] if isinstance(out, tuple) else out
    r = (hid - state["inp"]).float()
    B = r.shape[0]; flat = r.reshape(B, -1)
    g = torch.Generator().manual_seed(state["call"])
    if state["mode"] == "along":
        d = args.eps * flat
    elif state["mode"] == "against":
        d = -args.eps * flat
    else:
        u = torch.randn(flat.shape, generator=g)
        u = u - (u * flat).sum(1, keepdim=True) / (flat * flat).sum(1, keepdim=True) * flat
        d = u / u.norm(dim=1, keepdim=True) * flat.norm(dim=1, keepdim=True) * args.eps
    hid = hid + d.reshape(hid.shape).to(hid.dtype)
    return (out[0], hid) if isinstance(out, tuple) else hid
blocks[0].register_forward_pre_hook(pre, with_kwargs=True)
blocks[-1].register_forward_hook(post, with_kwargs=True)
# note: pre-hook counts calls of block 0 = transformer calls
full = bench.sample(pipe, args.steps, **given)
at = args.at or list(range(2, args.steps, max(1, args.steps // 10)))
print(f"{args.model} {args.steps} steps, eps {args.eps}, {args.samples} samples: PSNR vs full after one perturbed step")
for k in at:
    res = {}
    for mode in ("along", "against", "orth"):
        state.update(call=-1, target=k, mode=mode)
        out = bench.sample(pipe, args.steps, **given)
        res[mode] = metrics.psnr(full, out)
    print(f"step {k:3d}: along {res['along']:6.2f}  against {res['against']:6.2f}  orth {res['orth']:6.2f}  "
          f"(along-orth {min(res['along'],res['against'])-res['orth']:+.2f} dB)", flush=True)
