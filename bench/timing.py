"""Re-time benchmark rows on a quiet machine: each row against the full run, interleaved, median of repeats.

    python bench/timing.py --models mnist-dit mnist-flux --steps 20 28 --repeats 5   # rows not re-timed yet
    python bench/timing.py ... --redo                                               # all matching rows again

The speedups that bench/benchmark.py measures while other jobs share the two cores are noisy (a row can come out
faster than its ideal N / computed ratio). This script rebuilds every row of bench/results/<model>.jsonl whose
configuration it can recognise from the label, runs it and the full run alternately ``--repeats`` times on
``--samples`` images with one thread, and writes ``bench/results/timing-<model>.jsonl``; bench/report.py prefers
these speedups and says so.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import tcpade_fx  # noqa: E402
from benchmark import RESULTS, SAMPLES, ImageSamples, euler, unipc  # noqa: E402
from tcpade_fx import Policy, metrics, models  # noqa: E402


def configuration(row: dict):
    """(scheduler factory, policy or None, steps to run) for a row label, or None if not recognised."""
    label, n = row["label"], row["steps"]
    if m := re.fullmatch(r"full \((Euler|UniPC)\)", label):
        return (euler if m[1] == "Euler" else unipc), None, n
    if m := re.fullmatch(r"fewer steps (Euler|UniPC) \((\d+)\)", label):
        return (euler if m[1] == "Euler" else unipc), None, int(m[2])
    if m := re.fullmatch(r"TC-Padé (\w+)( on UniPC)?", label):
        return (unipc if m[2] else euler), Policy.preset(m[1]), n
    if m := re.fullmatch(r"TC-Padé (\w+) \+ input gate", label):
        return euler, Policy.preset(m[1]).replace(input_gate=True), n
    if m := re.fullmatch(r"(reuse|Taylor-(\d)) on \w+ schedule", label):
        method, order = ("reuse", 0) if m[1] == "reuse" else ("taylor", int(m[2]))
        return euler, Policy(method=method, order=order, late_order=min(order, 1), schedule="explicit",
                             mask=row["schedule"]), n
    if (m := re.fullmatch(r"(reuse|Taylor-(\d)|Padé \[1/1\]) fixed every \d+", label)) and row.get("schedule"):
        method, order = ("reuse", 0) if m[1] == "reuse" else ("taylor", int(m[2])) if m[2] else ("pade", 1)
        # the row's own schedule replayed: the same computed steps, hence the same cost as the fixed policy
        return euler, Policy(method=method, order=order, late_order=order, schedule="explicit",
                             mask=row["schedule"], modulate_denominator=False), n
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["mnist-dit", "mnist-flux"])
    ap.add_argument("--steps", nargs="+", type=int, default=[20, 28])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--match", default=r"TC-Padé|fewer steps|full|schedule|fixed", help="regex on the row labels to re-time")
    ap.add_argument("--redo", action="store_true", help="re-time rows that already have a timing record too")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = Path(args.results)
    seeds = list(range(args.samples))
    labels = [s % 10 for s in seeds]

    for model in args.models:
        kind = SAMPLES.get(model, ImageSamples)()  # the benchmark's latent shape and guidance for this model
        latents = metrics.seeded_latents(seeds, kind.latent_shape)

        def run(pipe, steps):
            return pipe(labels, latents=latents, num_inference_steps=steps, guidance_scale=kind.guidance,
                        output_type="pt")

        rows = [json.loads(x) for x in (results / f"{model}.jsonl").read_text().splitlines() if x.strip()]
        out = results / f"timing-{model}.jsonl"
        timed = set()
        if out.exists() and not args.redo:
            timed = {(t["steps"], t["label"]) for t in (json.loads(x) for x in out.read_text().splitlines() if x.strip())}
        for row in rows:
            if (row.get("fd_only") or (row["steps"], row["label"]) in timed or row["steps"] not in args.steps
                    or not re.search(args.match, row["label"])
                    or (conf := configuration(row)) is None):
                continue
            make_scheduler, policy, steps = conf
            shift = row.get("shift", 1.0)  # the row's own schedule (rows before the field were all at shift 1)
            full = models.load(model)
            full.scheduler = euler(shift) if row.get("full", "euler") == "euler" else unipc(shift)
            pipe = models.load(model)
            pipe.scheduler = make_scheduler(shift)
            if policy is not None:
                tcpade_fx.compile(pipe, policy=policy)
            run(pipe, steps)
            run(full, row["steps"])  # warm-up both
            ratios = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                run(full, row["steps"])
                t1 = time.perf_counter()
                run(pipe, steps)
                t2 = time.perf_counter()
                ratios.append((t1 - t0) / (t2 - t1))
            record = {"model": model, "steps": row["steps"], "label": row["label"], "speedup": round(statistics.median(ratios), 3),
                      "ratios": [round(r, 3) for r in ratios], "samples": args.samples}
            with out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            timed.add((row["steps"], row["label"]))  # the same row at another sample count is timed once
            print(f"{model} N={row['steps']} {row['label']:<34} speedup {record['speedup']:.2f} (ideal "
                  f"{row['ideal_speedup']}) {record['ratios']}", flush=True)


if __name__ == "__main__":
    main()
