"""The one-step error of each prediction in the cached run itself (closed loop): at every predicted step the block
stack is also computed at the cached run's own state and the prediction compared with it.

    python bench/closed_loop_errors.py MODEL STEPS PRESET [--samples 16] [--split]

For the preset and for Taylor-2 on the preset's plan: PSNR vs the full Euler run (seeds 0.., the benchmark's
sampling), then per predicted step of branch 0 the mean per-sample relative error ‖R − R̂‖ / ‖R‖ against that
shadow computation (which does not change the run: the prediction is what the run steps with). Teacher-forced
errors (nodes from the full run) are in bench/ADAPTIVE_STUDY.md section 9; comparing the two says whether the
cached run's drifted nodes make a prediction worse than the full run's would. ``--split``: the error R̂ − R split into
its signed part along R (⟨R̂ − R, R⟩ / ‖R‖²: a prediction too large (+) or too small (−) in R's own direction)
and the rest (‖orthogonal part‖ / ‖R‖), per step and summed over the predicted steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import tcpade_fx.runtime as R  # noqa: E402
from benchmark import Bench  # noqa: E402
from granularity_check import variants  # noqa: E402
from tcpade_fx import Policy, metrics  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("steps", type=int)
    ap.add_argument("preset")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--split", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    bench = Bench(args.model, args.samples, timing_samples=0, repeats=0, batch=16)
    seeds = list(range(args.samples))
    given = bench.given(seeds)
    full = bench.sample(bench.pipe(bench.euler()), args.steps, **given)
    base = Policy.preset(args.preset)  # and Taylor-2 on its plan as the granularity check runs it
    errors: list[tuple[int, int, tuple[float, ...]]] = []
    run = R.TCPadeRuntime._run

    def shadowed_run(self, graphs, branch, leaves, time, context, batch=1, deferred=None):
        compute, predict = graphs.compute, graphs.predict

        def predict_and_compare(*leaves_and_residual):
            *call, residual = leaves_and_residual
            actual = compute(*call)[-1].reshape(residual.shape[0], -1).float()
            predicted = residual.reshape(actual.shape).float()
            diff, energy = predicted - actual, (actual * actual).sum(dim=1)
            if args.split:
                along = (diff * actual).sum(dim=1) / energy
                rest = torch.linalg.vector_norm(diff - along[:, None] * actual, dim=1) / energy.sqrt()
                error = (float(along.mean()), float(rest.mean()))
            else:
                error = (float((torch.linalg.vector_norm(diff, dim=1) / energy.sqrt()).mean()),)
            errors.append((self._step, branch.index, error))
            return predict(*leaves_and_residual)

        graphs.predict = predict_and_compare
        try:
            return run(self, graphs, branch, leaves, time, context, batch, deferred)
        finally:
            graphs.predict = predict

    R.TCPadeRuntime._run = shadowed_run
    try:
        for name, policy in [("preset", base), ("Taylor-2", dict(variants(args.preset))["stack Taylor-2"])]:
            errors.clear()
            out = bench.sample(bench.pipe(bench.euler(), policy), args.steps, **given)
            per_step: dict[int, list[tuple[float, ...]]] = {}
            for step, branch, error in errors:
                if branch == 0:
                    per_step.setdefault(step, []).append(error)
            means = {k: [statistics.mean(col) for col in zip(*v)] for k, v in sorted(per_step.items())}
            cells = " ".join(f"{k}:" + "/".join(f"{x:+.4f}" if args.split and i == 0 else f"{x:.4f}"
                                                  for i, x in enumerate(m)) for k, m in means.items())
            sums = [sum(m[i] for m in means.values()) for i in range(len(next(iter(means.values()))))]
            total = (f"sum along {sums[0]:+.3f}, sum of |along| {sum(abs(m[0]) for m in means.values()):.3f}, "
                     f"sum orthogonal {sums[1]:.3f}" if args.split else f"sum {sums[0]:.3f}")
            print(f"{name:8s} {metrics.psnr(full, out):6.2f} dB; {total}; step:error {cells}", flush=True)
    finally:
        R.TCPadeRuntime._run = run


if __name__ == "__main__":
    main()
