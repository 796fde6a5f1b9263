"""The library's module granularity (``Policy(granularity="modules")``) against the shipped stack presets, on the
benchmark's samples: each preset as shipped, the same preset forecasting every block's attention/feed-forward
outputs with Taylor-1 (TaylorSeer's units and extrapolant), the same preset forecasting them with its own
TC-Padé numerics, and the preset forecasting the stack residual with Taylor-1 (the candidates of
``tcpade_fx.calibrate``). Rows run through ``tcpade_fx.compile`` (no study harness); each row's schedule is its own run's
(the plan, moved by the error estimate). PSNR vs the full Euler run of the same samples, sampled as the benchmark
does (mnist-wan over all frames, shift 3, guidance 5; image models shift 1, guidance 1.5), plus the per-sample
median gain over the shipped preset and the share of samples it improves.

    python bench/granularity_check.py [--models mnist-dit mnist-flux mnist-wan] [--steps 20 28 50]
                                      [--presets balanced fast] [--samples 100] [--seed0 0] [--out FILE]
                                      [--variants shipped "input gate" ...]

Results are appended to ``--out`` (default bench/results/granularity-check.jsonl); a cell already there is skipped.
``--table`` prints the Markdown table of what ``--out`` holds (PSNR; median per-sample gain over the shipped preset
and the share of samples improved, in brackets).
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
from extrapolant_check import per_sample_mse  # noqa: E402
from tcpade_fx import Policy, metrics  # noqa: E402
from tcpade_fx.calibrate import calibration_candidates  # noqa: E402


#: ``tcpade_fx.calibrate``'s candidate names -> the row names this script stores its results under
VARIANT = {"as given": "shipped", "stack Taylor-1": "stack Taylor-1", "modules Taylor-1": "modules Taylor-1",
           "modules, its numerics": "modules TC-Padé", "input gate": "input gate",
           "without input gate": "without input gate", "gap correction": "gap correction",
           "without gap correction": "without gap correction"}


def variants(preset: str) -> list[tuple[str, Policy]]:
    """(variant, policy): calibrate's candidates for the preset (the preset as shipped first; the input gate and the
    other setting of ``gap_correction`` among them), stack Taylor-2, and stack Taylor-1 with the other setting of
    ``gap_correction``."""
    shipped = Policy.preset(preset)
    taylor2 = shipped.replace(method="taylor", modulate_denominator=False, order=2, late_order=2,
                              history_size=max(3, shipped.history_size), gap_correction=0.0)
    candidates = calibration_candidates(shipped)
    taylor1 = dict(candidates)["stack Taylor-1"]
    flip = 0.0 if shipped.gap_correction else 1.0
    word = "without gap correction" if shipped.gap_correction else "gap correction"
    return ([(VARIANT[name], policy) for name, policy in candidates]
            + [("stack Taylor-2", taylor2), (f"stack Taylor-1, {word}", taylor1.replace(gap_correction=flip))])


def row_label(preset: str, variant: str) -> str:
    return f"TC-Padé {preset}" if variant == "shipped" else f"TC-Padé {preset}, {variant}"


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    by = {(r["model"], r["steps"], r["row"], r["samples"], r["seed0"]): r for r in rows}
    cells = sorted({(r["model"], r["steps"], r["preset"], r["samples"], r["seed0"]) for r in rows},
                   key=lambda c: (c[0], c[2] != "balanced", c[1], c[3], c[4]))
    names = list(dict.fromkeys(v for p in ("balanced", "fast") for v, _ in variants(p)))
    names += [n for n in ("gap correction", "stack Taylor-1, gap correction") if n not in names]  # earlier "fast"'s
    lines = ["| model | N | preset | samples | " + " | ".join(names) + " |", "|---|---|---|---|" + "---|" * len(names)]
    for model, n, preset, samples, seed0 in cells:
        out = []
        for v in names:
            r = by.get((model, n, row_label(preset, v), samples, seed0))
            if r is None:
                out.append("")
            elif v == "shipped":
                out.append(f"{r['psnr']:.2f}")
            else:
                out.append(f"{r['psnr']:.2f} ({r['median_gain_over_preset_db']:+.2f}, "
                           f"{100 * r['share_better_than_preset']:.0f} %)")
        lines.append(f"| {model} | {n} | {preset} | {samples} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mnist-dit", "mnist-flux", "mnist-wan"])
    ap.add_argument("--steps", nargs="+", type=int, default=[20, 28, 50])
    ap.add_argument("--presets", nargs="+", default=["balanced", "fast"])
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--seed0", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "granularity-check.jsonl")
    ap.add_argument("--variants", nargs="+", default=None,
                    help="run only these rows (names as in the table; the shipped preset always runs: the gains are "
                         "over it)")
    ap.add_argument("--table", action="store_true", help="print the table of --out and exit")
    args = ap.parse_args()
    if args.table:
        print(table(args.out))
        return
    torch.set_num_threads(1)
    done = set()
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["model"], r["steps"], r["row"], r["samples"], r["seed0"]))
    for model in args.models:
        bench = Bench(model, args.samples, timing_samples=0, repeats=0, batch=16)
        seeds = list(range(args.seed0, args.seed0 + args.samples))
        given = bench.given(seeds)
        for n in args.steps:
            rows = [(p, row_label(p, v), policy) for p in args.presets for v, policy in variants(p)
                    if args.variants is None or v == "shipped" or v in args.variants]
            if all((model, n, label, args.samples, args.seed0) in done for _, label, _ in rows):
                continue
            full = bench.sample(bench.pipe(bench.euler()), n, **given)
            shipped: dict[str, torch.Tensor] = {}
            for preset, label, policy in rows:  # the shipped preset first: the gains are over it
                if (model, n, label, args.samples, args.seed0) in done and preset in shipped:
                    continue
                out = bench.sample(bench.pipe(bench.euler(), policy), n, **given)
                shipped.setdefault(preset, out)
                if (model, n, label, args.samples, args.seed0) in done:
                    continue
                gain = 10 * torch.log10(per_sample_mse(full, shipped[preset]) / per_sample_mse(full, out))
                row = {"model": model, "steps": n, "preset": preset, "row": label, "samples": args.samples,
                       "seed0": args.seed0, "psnr": round(metrics.psnr(full, out), 2),
                       "compute": round(bench.computed_calls / max(1, bench.calls), 3),
                       "schedule": bench.schedules[0],
                       "median_gain_over_preset_db": round(float(gain.median()), 2),
                       "share_better_than_preset": round(float((gain > 0).float().mean()), 2)}
                with args.out.open("a") as f:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                print(json.dumps(row, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
