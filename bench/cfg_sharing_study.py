"""Does sharing what the two guidance branches know beat predicting each branch from its own history, at equal
compute, on mnist-wan (guidance 5 as two transformer calls per step, the bundled shift-3 Euler scheduler)?

    python bench/cfg_sharing_study.py [--steps 20] [--seeds 0] [--samples 16]

A study harness, not the library: the transformer's block list is replaced by one module that runs the stack or
predicts its residual ``r`` (output − input) per call, after a schedule with one character per step:

* ``B``: both branches computed (and the guidance difference ``D = r_cond − r_uncond`` recorded);
* ``c``: the conditional branch computed, the unconditional one taken as ``r_cond − D̂`` (FasterCache's CFG-Cache
  idea: the difference of the branches changes slowly);
* ``.``: both predicted, each by Padé [1/1] from its own newest 3 residuals (what TC-Padé does), or with
  ``--dot delta`` the unconditional one as ``r̂_cond − D̂``.

``D̂`` is the newest ``D`` (``--delta reuse``) or its Taylor-1 / Padé [1/1] extrapolation. With ``--store-estimates``
(default) an unconditional residual taken as ``r_cond − D̂`` enters that branch's history as a node. Compute: the
share of the 2·N transformer calls that ran the stack. PSNR over all frames vs the full run of the same seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchmark import Bench  # noqa: E402
from tcpade_fx import metrics  # noqa: E402
from tcpade_fx.pade import extrapolate  # noqa: E402

#: (schedule, what "." does) rows at 20 steps: per-branch prediction on balanced's schedule, the same schedule with
#: the unconditional branch predicted through D, and cond-only steps in place of (or beside) both-branch steps
ROWS_20 = [("BB..B..B..B..B..B..B", "own"), ("BB..B..B..B..B..B..B", "delta"),
           ("BBc.c.B.c.c.B.c.c..B", "own"), ("BBc.B.cB.cB.c.B.c..B", "own")]


class SharedGuidance:
    """Decides and predicts each call of one trajectory (calls alternate cond, uncond as in the pipeline)."""

    def __init__(self, times: list[float], schedule: str, dot: str, delta: str, store_estimates: bool):
        self.times, self.schedule, self.dot, self.delta, self.store = times, schedule, dot, delta, store_estimates
        self.calls = self.computed = 0
        self.history: dict[int, list[tuple[float, torch.Tensor]]] = {0: [], 1: []}
        self.differences: list[tuple[float, torch.Tensor]] = []
        self.current: dict[int, torch.Tensor] = {}

    def _extrapolate(self, nodes: list, t: float, method: str) -> torch.Tensor:
        ts, rs = zip(*nodes[-3:])
        return extrapolate(list(ts), list(rs), t, method=method, order=1)

    def _difference(self, t: float) -> torch.Tensor:
        return (self.differences[-1][1] if self.delta == "reuse" or len(self.differences) == 1
                else self._extrapolate(self.differences, t, self.delta))

    def __call__(self, hidden: torch.Tensor, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        step, branch = divmod(self.calls, 2)
        self.calls += 1
        t = self.times[step]
        kind = self.schedule[step] if step < len(self.schedule) and self.history[branch] else "B"
        compute = kind == "B" or (kind == "c" and branch == 0)
        estimate = False
        if compute:
            out = run()
            residual = out - hidden
            self.computed += 1
        else:
            estimate = branch == 1 and (kind == "c" or self.dot == "delta") and bool(self.differences)
            residual = (self.current[0] - self._difference(t) if estimate
                        else self._extrapolate(self.history[branch], t, "pade"))
            out = hidden + residual
        self.current[branch] = residual
        if compute or (estimate and kind == "c" and self.store):
            self.history[branch] = [*self.history[branch], (t, residual)][-3:]
        if branch == 1 and kind == "B":
            self.differences = [*self.differences, (t, self.current[0] - residual)][-3:]
        return out


class _Stack(torch.nn.Module):
    def __init__(self, blocks: torch.nn.ModuleList):
        super().__init__()
        self.blocks = blocks
        self.decide: SharedGuidance | None = None

    def forward(self, hidden, encoder_hidden_states, timestep_proj, rotary_emb):
        def run():
            h = hidden
            for block in self.blocks:
                h = block(h, encoder_hidden_states, timestep_proj, rotary_emb)
            return h
        return self.decide(hidden, run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--schedules", nargs="+", default=None, help="rows as SCHEDULE:own|delta (default: ROWS_20)")
    ap.add_argument("--delta", default="reuse", choices=["reuse", "taylor", "pade"])
    ap.add_argument("--no-store-estimates", action="store_true")
    ap.add_argument("--seeds", type=int, default=0, help="first seed (0: the benchmark's)")
    ap.add_argument("--samples", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [tuple(r.split(":")) for r in args.schedules] if args.schedules else ROWS_20
    bench = Bench("mnist-wan", args.samples, timing_samples=0, repeats=0, batch=args.samples)
    seeds = list(range(args.seeds, args.seeds + args.samples))
    given = bench.given(seeds)
    full = bench.sample(bench.pipe(bench.euler()), args.steps, **given)
    for schedule, dot in rows:
        pipe = bench.pipe(bench.euler())
        pipe.scheduler.set_timesteps(args.steps)
        stack = _Stack(pipe.transformer.blocks)
        pipe.transformer.blocks = torch.nn.ModuleList([stack])
        stack.decide = SharedGuidance([float(s) for s in pipe.scheduler.sigmas[:args.steps]], schedule, dot,
                                      args.delta, not args.no_store_estimates)
        out = bench.sample(pipe, args.steps, **given)
        cost = sum({"B": 2, "c": 1}.get(k, 0) for k in schedule) / (2 * len(schedule))
        print(json.dumps({"steps": args.steps, "seeds": args.seeds, "schedule": schedule, "dot": dot,
                          "delta": args.delta, "store_estimates": not args.no_store_estimates,
                          "compute": round(cost, 3), "computed_calls": stack.decide.computed,
                          "psnr": round(metrics.psnr(full, out), 2)}), flush=True)


if __name__ == "__main__":
    main()
