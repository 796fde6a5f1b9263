"""How good can a whole-stack residual get on mnist-wan at 20 steps and the bundled shift 3 with the budget of
"balanced"? A local search over explicit schedules (which steps are computed, ``C``; which predicted, ``.``) with
the same number of computed steps, tuned on one seed set and read on another (the benchmark's).

    python bench/wan_mask_search.py [--steps 20] [--computes 8] [--method pade] [--out runs/wan_mask_search.jsonl]

Moves: shift one computed step to a free position at most ``--reach`` steps away (the first and last step stay computed). Greedy: take the
best improving move until none improves. Every row printed as JSON; the final schedule also read on the held-out
seeds (0..15, the benchmark's) against the shipped "balanced".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchmark import Bench  # noqa: E402
from tcpade_fx import Policy, metrics  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--start", default=None, help="the schedule to start from (default: balanced's)")
    ap.add_argument("--method", default="pade")
    ap.add_argument("--order", type=int, default=1)
    ap.add_argument("--tune-seeds", type=int, default=100)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--reach", type=int, default=3, help="how far one move shifts a computed step")
    ap.add_argument("--out", default=str(ROOT / "runs" / "wan_mask_search.jsonl"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    bench = Bench("mnist-wan", args.samples, timing_samples=0, repeats=0, batch=args.samples)
    n = args.steps
    tune_seeds = list(range(args.tune_seeds, args.tune_seeds + args.samples))
    tune = dict(labels=[s % 10 for s in tune_seeds], latents=bench.latents_for(tune_seeds))
    full_tune = bench.sample(bench.pipe(bench.euler()), n, **tune)
    full_held = bench.reference("euler", lambda: bench.pipe(bench.euler()), n)
    out = open(args.out, "a")
    seen: dict[str, float] = {}

    def policy(mask: str) -> Policy:
        return Policy.preset("balanced").replace(schedule="explicit", mask=mask, method=args.method,
                                                 order=args.order, late_order=args.order)

    def score(mask: str) -> float:
        if mask not in seen:
            seen[mask] = metrics.psnr(full_tune, bench.sample(bench.pipe(bench.euler(), policy(mask)), n, **tune))
            row = {"steps": n, "method": args.method, "order": args.order, "mask": mask, "tune_psnr": round(seen[mask], 2)}
            print(json.dumps(row), flush=True)
            out.write(json.dumps(row) + "\n")
            out.flush()
        return seen[mask]

    shipped = bench.sample(bench.pipe(bench.euler(), "balanced"), n, **tune)
    start = args.start or bench.schedules[0]
    print("shipped balanced", start, round(metrics.psnr(full_tune, shipped), 2), flush=True)
    best, best_psnr = start, score(start)
    while True:
        cs = [i for i, c in enumerate(best) if c == "C" and 0 < i < n - 1]
        free = [i for i, c in enumerate(best) if c == "." ]
        moves = []
        for i in cs:
            for j in (j for j in free if abs(j - i) <= args.reach):
                m = list(best)
                m[i], m[j] = ".", "C"
                moves.append("".join(m))
        scored = [(score(m), m) for m in moves]
        top, mask = max(scored)
        if top <= best_psnr + 0.05:
            break
        best, best_psnr = mask, top
        print("best", best, round(best_psnr, 2), flush=True)
    held = metrics.psnr(full_held, bench.sample(bench.pipe(bench.euler(), policy(best)), n))
    held_bal = metrics.psnr(full_held, bench.sample(bench.pipe(bench.euler(), "balanced"), n))
    row = {"steps": n, "method": args.method, "order": args.order, "final": best, "tune_psnr": round(best_psnr, 2),
           "held_psnr": round(held, 2), "held_balanced": round(held_bal, 2)}
    print(json.dumps(row), flush=True)
    out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
