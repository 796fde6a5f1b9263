"""Issue 14's quality targets on mnist-wan at more clips than the benchmark's 16: TC-Padé "balanced" vs as many
fewer steps (UniPC and Euler), PSNR over all frames vs the full Euler run, at 20 and 28 steps.

    python bench/wan_target_check.py                # 100 clips, about 15 min on one core
    python bench/wan_target_check.py --cells 20 --schedule 'C.C.C..C..C..C...C.C'   # and a given schedule
    python bench/wan_target_check.py --cells 28 --module-taylor    # and TaylorSeer's units on balanced's schedule
    python bench/wan_target_check.py --input-gate                  # and "balanced" with Policy.input_gate

The runs are the benchmark's own (:class:`benchmark.Bench`: its seeds, latents, guidance, schedulers and cached
full-run references); nothing is written to the benchmark's results.
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

#: steps N -> the computed steps of "balanced" (0.40 / 0.43 compute), the fewer-steps rows' step count
CELLS = {20: 8, 28: 12}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--schedule", action="append", default=[], metavar="MASK",
                    help="also read balanced's policy on this explicit schedule (C computed, . predicted) at the "
                         "mask's length in steps, e.g. the best of bench/wan_mask_search.py; repeatable")
    ap.add_argument("--module-taylor", action="store_true",
                    help="also read Taylor-1 forecasts of every block's attention / FFN outputs (diffusers TaylorSeer's "
                         "units, the harness of bench/granularity_study.py) on balanced's schedule: the granularity "
                         "the library does not have")
    ap.add_argument("--input-gate", action="store_true",
                    help="also read \"balanced\" with Policy(input_gate=True) (same schedule, the input-gated prediction)")
    ap.add_argument("--cells", nargs="+", type=int, default=list(CELLS), help="the step counts to read (20 28)")
    ap.add_argument("--shift", type=float, default=None,
                    help="the schedulers' time shift (default: the bundled scheduler's, 3)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    bench = Bench("mnist-wan", args.samples, timing_samples=0, repeats=0, batch=args.batch, shift=args.shift)
    psnr = {}
    for n, few in ((n, CELLS[n]) for n in args.cells):
        full = bench.reference("euler", lambda: bench.pipe(bench.euler()), n)
        rows = [("TC-Padé balanced", lambda: bench.pipe(bench.euler(), "balanced"), n),
                (f"fewer steps UniPC ({few})", lambda: bench.pipe(bench.unipc()), few),
                (f"fewer steps Euler ({few})", lambda: bench.pipe(bench.euler()), few)]
        if args.input_gate:
            gated = Policy.preset("balanced").replace(input_gate=True)
            rows.insert(1, ("TC-Padé balanced + input gate", lambda: bench.pipe(bench.euler(), gated), n))
        for mask in (m for m in args.schedule if len(m) == n):
            policy = Policy.preset("balanced").replace(schedule="explicit", mask=mask)
            rows.append((f"balanced on `{mask}`", lambda policy=policy: bench.pipe(bench.euler(), policy), n))
        for label, make, steps in rows:
            psnr[f"{n} {label}"] = round(metrics.psnr(full, bench.sample(make(), steps)), 2)
            print(n, label, psnr[f"{n} {label}"], flush=True)
            if label == "TC-Padé balanced":
                balanced_schedule = bench.schedules[0]
        if args.module_taylor:
            from granularity_study import UnitForecaster

            pipe = bench.pipe(bench.euler())
            UnitForecaster(pipe.transformer, balanced_schedule, "taylor", "module", bench.kind.calls_per_step)
            batch, bench.batch = bench.batch, args.samples  # the harness keeps one state per pipeline call
            label = "module Taylor-1 on balanced's schedule"
            psnr[f"{n} {label}"] = round(metrics.psnr(full, bench.sample(pipe, n)), 2)
            bench.batch = batch
            print(n, label, psnr[f"{n} {label}"], flush=True)
    print(json.dumps({"shift": bench.shift, **psnr}))


if __name__ == "__main__":
    main()
