"""Does ``tcpade_fx.calibrate`` choose well? Calibrate on a few samples, read the choice on the benchmark's 100.

For each model, step count and preset, ``--draws`` calibrations are run, each on ``--calibration-samples`` classes
(0, 1, ...) from one generator seeded 500, 501, ... (no benchmark seed), choosing by PSNR and compute alone
(``time_slack=None``); each line also records the run times and what the default 10 % time slack would have chosen
on this machine. Each choice is then read on the benchmark's
100 samples from ``bench/results/granularity-check.jsonl`` (``python bench/granularity_check.py``, the same four
candidates through ``tcpade_fx.compile``): the calibrated PSNR vs the shipped preset's, and vs the best candidate
in hindsight.

    python bench/calibration_check.py [--models mnist-dit mnist-flux mnist-wan mnist-dit-heldout]
                                      [--steps 20 28 50] [--presets balanced fast] [--draws 3]
                                      [--calibration-samples 8]

Appends one line per calibration to ``--out`` (default bench/results/calibration-check.jsonl; resumable), then
prints the table of choices joined with the benchmark rows.
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

import tcpade_fx  # noqa: E402
from benchmark import SAMPLES, ImageSamples, euler, scheduler_shift  # noqa: E402
from granularity_check import VARIANT, row_label  # noqa: E402
from tcpade_fx import models  # noqa: E402
from tcpade_fx.calibrate import choose  # noqa: E402

RESULTS = ROOT / "bench" / "results"
#: the choice rule the lines were made with (earlier lines: by the call's PSNR; then per sample with Taylor-2 among
#: the candidates; now with the other setting of gap_correction among them too, after gap_span_limit); only this rule's
#: lines are read
RULE = "per-sample median and share, and the call's PSNR; gap-correction toggle among the candidates"


def calibrations(args) -> list[dict]:
    done = {}
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            r = json.loads(line)
            if r.get("rule") == RULE:
                done[(r["model"], r["steps"], r["preset"], r["seed"], r["calibration_samples"])] = r
    for model in args.models:
        pipe = models.load(model)
        pipe.scheduler = euler(scheduler_shift(model))
        kind = SAMPLES.get(model, ImageSamples)()
        for n in args.steps:
            for preset in args.presets:
                for d in range(args.draws):
                    key = (model, n, preset, 500 + d, args.calibration_samples)
                    if key in done:
                        continue
                    call = {"class_labels": [i % 10 for i in range(args.calibration_samples)],
                            "num_inference_steps": n, "guidance_scale": kind.guidance}
                    choice = tcpade_fx.calibrate(pipe, call, policy=preset, seed=500 + d, time_slack=None)
                    row = {"rule": RULE, "model": model, "steps": n, "preset": preset, "seed": 500 + d,
                           "calibration_samples": args.calibration_samples, "chosen": choice.chosen,
                           "chosen_within_10_percent_time": choose(choice.candidates, choice.margin, choice.agreement,
                                                                   0.1).name,
                           "scores": {c.name: round(c.psnr, 2) for c in choice.candidates},
                           "median_gain": {c.name: round(c.median_gain, 2) for c in choice.candidates},
                           "share_better": {c.name: round(c.share_better, 2) for c in choice.candidates},
                           "gains": {c.name: [round(g, 3) for g in c.gains] for c in choice.candidates},
                           "compute": {c.name: round(c.compute, 3) for c in choice.candidates},
                           "time_ratio": {c.name: round(c.time_ratio, 3) for c in choice.candidates}}
                    with args.out.open("a") as f:
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    print(json.dumps(row, ensure_ascii=False), flush=True)
                    done[key] = row
    return [r for k, r in done.items() if k[0] in args.models and k[1] in args.steps and k[2] in args.presets
            and k[4] == args.calibration_samples]


def table(rows: list[dict]) -> str:
    bench, medians = {}, {}
    path = RESULTS / "granularity-check.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        if r["samples"] == 100 and r["seed0"] == 0:
            bench[(r["model"], r["steps"], r["row"])] = r["psnr"]
            medians[(r["model"], r["steps"], r["row"])] = r["median_gain_over_preset_db"]
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["model"], r["steps"], r["preset"]), []).append(r)
    lines = ["| model | N | preset | choices (of the draws) | shipped | calibrated (mean over draws) | gain | median "
             "per-sample gain of the choices | best in hindsight |", "|---|---|---|---|---|---|---|---|---|"]
    for (model, n, preset), draws in sorted(cells.items()):
        scores = {name: bench.get((model, n, row_label(preset, variant))) for name, variant in VARIANT.items()}
        if any(scores[d["chosen"]] is None for d in draws) or scores["as given"] is None:
            continue  # a choice with no benchmark row to read it on
        scores = {k: v for k, v in scores.items() if v is not None}  # "best in hindsight" among the rows measured
        got = [scores[d["chosen"]] for d in draws]
        per_sample = [medians[(model, n, row_label(preset, VARIANT[d["chosen"]]))] for d in draws]
        mean = sum(got) / len(got)
        best = max(scores, key=scores.get)
        choices = ", ".join(f"{name} ×{sum(d['chosen'] == name for d in draws)}" for name in VARIANT
                            if any(d["chosen"] == name for d in draws))
        lines.append(f"| {model} | {n} | {preset} | {choices} | {scores['as given']:.2f} | {mean:.2f} | "
                     f"{mean - scores['as given']:+.2f} | {sum(per_sample) / len(per_sample):+.2f} | {best} "
                     f"{scores[best]:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mnist-dit", "mnist-flux", "mnist-wan", "mnist-dit-heldout"])
    ap.add_argument("--steps", nargs="+", type=int, default=[20, 28, 50])
    ap.add_argument("--presets", nargs="+", default=["balanced", "fast"])
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--calibration-samples", type=int, default=8)
    ap.add_argument("--out", type=Path, default=RESULTS / "calibration-check.jsonl")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [] if args.table_only else calibrations(args)
    if args.table_only:
        rows = [r for r in map(json.loads, args.out.read_text().splitlines()) if r.get("rule") == RULE
                and r["calibration_samples"] == args.calibration_samples]
    print(table(rows))


if __name__ == "__main__":
    main()
