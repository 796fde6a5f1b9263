"""Numeric study: extrapolation error of Padé [L/1] vs polynomial (Taylor) vs reuse on synthetic vector trajectories.

No model involved: each trajectory is a vector R(t) ∈ R^D (D elements with their own random amplitudes and rates,
as the elements of a transformer residual have), sampled on a uniform grid of step h = 1/28 with t decreasing from
1 to 0 as diffusion times do. For a gap g (1–4 steps) the history is the newest computed points spaced g steps apart
(as a schedule computing every g-th step has) and the prediction is made g steps past the newest one:

    history t_i, t_{i−g}, t_{i−2g}, t_{i−3g}   →   predict R(t_{i+g})

Reported: the median over all anchors i and over seeds of the relative error ‖R̂ − R‖ / ‖R‖ (in %), one shared
denominator per trajectory (``per_sample=False``), the library's own :func:`tcpade_fx.extrapolate` with its
default safeguards; and how often the [1/1] fit was rejected by a safeguard (b = 0, i.e. it fell back to Taylor-1).

    python bench/numeric_study.py            # prints the table, writes bench/NUMERIC_STUDY.md (table part)
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from statistics import median

import torch

from tcpade_fx import extrapolate, fit_denominator, relative_error

H = 1.0 / 28
TIMES = [1.0 - i * H for i in range(29)]
GAPS = (1, 2, 3, 4)
METHODS = (
    ("reuse", "reuse", 0),
    ("Taylor-1", "taylor", 1),
    ("Taylor-2", "taylor", 2),
    ("Padé [0/1]", "pade", 0),
    ("Padé [1/1]", "pade", 1),
    ("Padé [2/1]", "pade", 2),
)


def families(d: int, g: torch.Generator) -> dict[str, callable]:
    """Trajectory families; s = 1 − t is the progress (0 at pure noise, 1 at the end)."""
    def r(lo=-1.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(d, generator=g, dtype=torch.float64)

    a, b, c = r(), r(), r()
    k = r(1.0, 5.0)
    k_shared = float(r(1.0, 5.0)[0])
    t0 = r(0.35, 0.65)
    w = r(4.0, 12.0)
    phi = r(0.0, 2 * math.pi)

    def s(t):
        return 1.0 - t

    return {
        "saturate tanh(k·s)": lambda t: a + b * torch.tanh(k * s(t)),
        "saturate 1−exp(−k·s)": lambda t: a + b * (1 - torch.exp(-k * s(t))),
        "decay exp(−k·s)": lambda t: a + b * torch.exp(-k * s(t)),
        "decay 1/(1+k·s), k per element": lambda t: a + b / (1 + k * s(t)),
        "decay 1/(1+k·s), k shared": lambda t: a + b / (1 + k_shared * s(t)),
        "switch: smooth step (width 0.05)": lambda t: a + b * torch.sigmoid((s(t) - t0) / 0.05) + 0.3 * c * s(t),
        "switch: kink (piecewise linear)": lambda t: a + b * torch.clamp(s(t) - t0, min=0.0) + 0.3 * c * s(t),
        "oscillate sin(w·s+φ)": lambda t: a + 0.5 * b * torch.sin(w * s(t) + phi),
    }


#: families whose samples are also studied rounded to bfloat16, as a bf16 model's residuals are (~0.2 % noise)
BF16 = ("saturate tanh(k·s)", "decay exp(−k·s)", "decay 1/(1+k·s), k shared")


def study(seeds: int, dim: int) -> dict:
    """errors[family][gap][method] = list of relative errors; fallback[family][gap] = list of bools."""
    errors: dict = {}
    fallback: dict = {}
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        fams = families(dim, g)
        cases = [(fam, f, torch.float32) for fam, f in fams.items()]
        cases += [(fam + ", bf16", fams[fam], torch.bfloat16) for fam in BF16]
        for fam, f, dtype in cases:
            vals = [f(t).to(dtype) for t in TIMES]
            for gap in GAPS:
                e_fam = errors.setdefault(fam, {}).setdefault(gap, {})
                fb = fallback.setdefault(fam, {}).setdefault(gap, [])
                for i in range(3 * gap, len(TIMES) - gap):
                    idx = [i - 3 * gap, i - 2 * gap, i - gap, i]
                    ts, rs = [TIMES[j] for j in idx], [vals[j] for j in idx]
                    target, actual = TIMES[i + gap], vals[i + gap]
                    for label, method, order in METHODS:
                        pred = extrapolate(ts, rs, target, method=method, order=order, per_sample=False)
                        e = float(relative_error(actual.float(), pred.float(), per_sample=False))
                        e_fam.setdefault(label, []).append(e)
                    b = fit_denominator(ts[-3:], rs[-3:], target, per_sample=False)
                    fb.append(bool(b.item() == 0.0))
    return {"errors": errors, "fallback": fallback}


def quantile(v: list[float], q: float) -> float:
    return float(torch.quantile(torch.tensor(v, dtype=torch.float64), q))


def table(res: dict, q: float) -> str:
    """One row per (family, gap): the q-quantile of the relative error (%) per method, the row's best in bold."""
    labels = [m[0] for m in METHODS]
    head = "| trajectory | gap | " + " | ".join(labels) + " | [1/1] fell back |"
    sep = "|---|---|" + "---|" * len(labels) + "---|"
    rows = [head, sep]
    for fam, by_gap in res["errors"].items():
        for gap, by_m in by_gap.items():
            vals = {m: quantile(v, q) * 100 for m, v in by_m.items()}
            best = min(vals.values())
            cells = []
            for m in labels:
                txt = f"{vals[m]:.3g}"
                cells.append(f"**{txt}**" if vals[m] <= best * 1.0000001 else txt)
            fb = res["fallback"][fam][gap]
            rows.append(f"| {fam} | {gap} | " + " | ".join(cells) + f" | {100 * sum(fb) / len(fb):.0f} % |")
    return "\n".join(rows)


def wins(res: dict, q: float) -> str:
    """In how many rows [1/1] has a lower q-quantile error than each other method."""
    n = 0
    beat: dict[str, int] = {}
    for by_gap in res["errors"].values():
        for by_m in by_gap.values():
            n += 1
            p = quantile(by_m["Padé [1/1]"], q)
            for m, v in by_m.items():
                if m != "Padé [1/1]":
                    beat[m] = beat.get(m, 0) + (p < quantile(v, q))
    return "Padé [1/1] is lower than " + ", ".join(f"{m} in {k}/{n}" for m, k in beat.items()) + " rows."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("NUMERIC_STUDY.md"),
                    help="markdown file; the part between the table markers is replaced, the rest kept")
    args = ap.parse_args()
    torch.set_num_threads(1)
    res = study(args.seeds, args.dim)
    parts = [
        f"Relative error (%) of the prediction g steps ahead (h = 1/28, history nodes g apart), over all anchors of "
        f"{args.seeds} seeds × D = {args.dim} elements; best of each row in bold. \"[1/1] fell back\": share of "
        f"anchors where a safeguard rejected the [1/1] denominator (b = 0: [1/1] is then exactly Taylor-1 on the "
        f"newest two nodes).",
    ]
    for q, name in ((0.5, "Median"), (0.9, "90th percentile")):
        parts.append(f"### {name}\n\n{table(res, q)}\n\n{wins(res, q)}")
    text = "\n\n".join(parts) + "\n"
    print(text)
    begin, end = "<!-- numeric_study.py: begin -->", "<!-- numeric_study.py: end -->"
    old = args.out.read_text() if args.out.exists() else f"# Numeric study\n\n{begin}\n{end}\n"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        tail = rest.split(end, 1)[1]
        args.out.write_text(f"{head}{begin}\n{text}{end}{tail}")
    else:
        args.out.write_text(old.rstrip("\n") + f"\n\n{begin}\n{text}{end}\n")


if __name__ == "__main__":
    main()
