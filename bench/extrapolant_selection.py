"""Choosing the extrapolant step by step from the a-posteriori check (``Policy.alternatives``), against the
extrapolants it chooses from run whole, and where along the trajectory Taylor-2's closed-loop gain comes from.

    python bench/extrapolant_selection.py CELLS... [--samples 16] [--from-step 0,0.3,0.5,0.7,0.85]

A cell is ``model:steps:preset`` (e.g. ``mnist-flux:50:balanced``). Per cell, PSNR vs the full Euler run of seeds
0.. (the benchmark's sampling): the preset, Taylor-1 / Taylor-2 on the preset's plan, the preset with
``alternatives=("taylor-1", "taylor-2")`` and with ``("taylor-2",)``; the last column is branch 0's sequence of
extrapolants (C computed, P the preset's own, 1 / 2 Taylor-1 / Taylor-2). With ``--from-step``: the preset with
Taylor-2 forced on every predicted step from progress s on (the choice overridden after each check). With
``--teacher-forced``: on the full run of seeds 2000.. (bench/signal_study.py's held-out seeds), each step after three
computed steps of the preset's schedule predicted from the newest three by Padé [1/1], Taylor-1 and Taylor-2 (mean
per-sample relative error; "check" rows are the computed steps, where the runtime's check measures).
Written for ADAPTIVE_STUDY.md section 9 (commit 'extrapolant selection'); the option was measured and removed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import tcpade_fx.runtime as R  # noqa: E402
from benchmark import Bench  # noqa: E402
from tcpade_fx import Policy, metrics  # noqa: E402

SYMBOL = {"policy": "P", "taylor-1": "1", "taylor-2": "2", None: "C"}


def teacher_forced(model: str, n: int, preset: str, samples: int) -> None:
    from signal_study import full_residuals, per_sample_error, preset_run
    from tcpade_fx.pade import extrapolate

    seeds = list(range(2000, 2000 + samples))
    labels = [s % 10 for s in seeds]
    latents = Bench(model, samples, timing_samples=0, repeats=0, batch=16).latents_for(seeds)
    times, residuals = full_residuals(model, labels, latents, n)
    schedule = preset_run(model, labels, latents, n, preset)[0]
    print(f"== {model}:{n}:{preset} teacher-forced, seeds 2000..{2000 + samples - 1}, schedule {schedule}")
    computed = [i for i, c in enumerate(schedule) if c == "C"]
    for i in range(n):
        nodes = [c for c in computed if c < i][-3:]
        if len(nodes) < 3:
            continue
        t, h, actual = [times[c] for c in nodes], [residuals[c] for c in nodes], residuals[i]
        errors = {
            "Pade[1/1]": extrapolate(t, h, times[i], method="pade", order=1),
            "Taylor-1": extrapolate(t[-2:], h[-2:], times[i], method="taylor", order=1),
            "Taylor-2": extrapolate(t, h, times[i], method="taylor", order=2),
        }
        cells = " ".join(f"{k} {per_sample_error(actual, v, samples).mean():.4f}" for k, v in errors.items())
        print(f"{'check' if schedule[i] == 'C' else 'pred':5s} step {i:2d} distance {i - nodes[-1]}: {cells}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cells", nargs="+")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--teacher-forced", action="store_true")
    ap.add_argument("--from-step", default=None, help="comma-separated progress values s for forced Taylor-2")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for cell in args.cells:
        model, n, preset = cell.split(":")
        n = int(n)
        if args.teacher_forced:
            teacher_forced(model, n, preset, args.samples)
            continue
        bench = Bench(model, args.samples, timing_samples=0, repeats=0, batch=16)
        seeds = list(range(args.samples))
        given = dict(labels=[s % 10 for s in seeds], latents=bench.latents_for(seeds))
        full = bench.sample(bench.pipe(bench.euler()), n, **given)
        base = Policy.preset(preset)
        print(f"== {cell}, {args.samples} samples")
        if args.from_step is None:
            rows = [("shipped", base),
                    ("Taylor-1", base.replace(method="taylor", modulate_denominator=False)),
                    ("Taylor-2", base.replace(method="taylor", modulate_denominator=False, order=2, late_order=2)),
                    ("select T1, T2", base.replace(alternatives=("taylor-1", "taylor-2"))),
                    ("select T2", base.replace(alternatives=("taylor-2",)))]
            for name, policy in rows:
                pipe = bench.pipe(bench.euler(), policy)
                out = bench.sample(pipe, n, **given)
                used = "".join("C" if r.computed else SYMBOL[r.extrapolant]
                               for r in pipe.tcpade.stats.records if r.branch == 0)
                print(f"{name:14s} {metrics.psnr(full, out):6.2f} {used if policy.alternatives else ''}", flush=True)
            continue
        choose = R.TCPadeRuntime._choose_extrapolant
        try:
            for s in (float(x) for x in args.from_step.split(",")):
                first = round(s * (n - 1))

                def forced(self, branch, errors, own, first=first):
                    in_use = choose(self, branch, errors, own)
                    branch.extrapolant = "taylor-2" if self._step >= first else "policy"
                    return in_use

                R.TCPadeRuntime._choose_extrapolant = forced
                out = bench.sample(bench.pipe(bench.euler(), base.replace(alternatives=("taylor-2",))), n, **given)
                print(f"Taylor-2 from s = {s} (step {first}): {metrics.psnr(full, out):6.2f}", flush=True)
        finally:
            R.TCPadeRuntime._choose_extrapolant = choose


if __name__ == "__main__":
    main()
