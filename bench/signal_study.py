"""Issue 13 part 2: which error signal ranks the actual error of the steps TC-Padé predicts?

    python bench/signal_study.py [--samples 24] [--models mnist-dit mnist-flux] [--steps 20 28] [--out FILE]

For each model, step count and preset ("balanced", "fast") the script takes the preset's schedule (the decisions of
a real run) and, on the full run of the same seeds (held out: seeds 2000.., no other study or preset used them),
predicts each of the schedule's predicted steps from the computed steps before it, as the runtime does (the newest
``history_size`` computed residuals, Padé [L/1] with L = nodes − 2 up to the policy's order). The prediction is
teacher-forced: its nodes are the full run's residuals, not those of the cached run (which has drifted by then), so
the "actual error" is the error of one prediction, not the accumulated one.

Signals, each computed without the residual it predicts:

* ``embedded``: ‖P − T‖ / ‖P‖, Padé against its b = 0 polynomial on the same nodes (no model cost);
* ``probe``: the relative error of the same extrapolation applied to the FIRST block's residual, which a probe would
  compute every step (1/L of a step: the signal DBCache uses);
* ``controller``: the runtime's own error estimate (TSI · ω) for that step in the preset run (None where the
  controller made none: those steps are left out of its correlation);
* ``gap``: |t − t_newest node| / span of the nodes, the trivial baseline every signal must beat;
* ``input``: the relative error of the same extrapolation applied to the block stack's INPUT (the head's output,
  which every step computes anyway: no model cost);
* ``input change``: ‖x(t) − x(t_newest node)‖ / ‖x(t_newest node)‖ of that input (TeaCache's kind of signal, on the
  unmodulated input; no model cost).

Rank correlations (Spearman): ``within`` a trajectory (over the predicted steps of one sample, mean over samples:
does the signal find the hard steps?) and ``across`` samples (over the samples at one predicted step, mean over
steps: does it find the hard samples of a batch, what per-sample compute needs?).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import tcpade_fx  # noqa: E402
import tcpade_fx.runtime as runtime_module  # noqa: E402
from benchmark import GUIDANCE, sample_images  # noqa: E402
from tcpade_fx import Policy, metrics, models  # noqa: E402
from tcpade_fx.pade import extrapolate  # noqa: E402

SIGNALS = ("embedded", "probe", "controller", "gap", "input", "input change")


def full_residuals(model: str, labels, latents, steps: int) -> tuple[list[float], list[torch.Tensor]]:
    """The body residual of every step of the full run, as the runtime pushes it: (times, (rows, F) tensors)."""
    pipe = models.load(model)
    tcpade_fx.compile(pipe, policy="full")
    seen: list[tuple[float, torch.Tensor]] = []
    push = runtime_module.Branch.push

    def recording_push(self, time, residual, keep):
        seen.append((time, residual.detach().reshape(residual.shape[0], -1).float().clone()))
        return push(self, time, residual, keep)

    runtime_module.Branch.push = recording_push
    try:
        sample_images(pipe, labels, latents, steps)
    finally:
        runtime_module.Branch.push = push
    assert len(seen) == steps, f"{len(seen)} residuals for {steps} steps"
    return [t for t, _ in seen], [r for _, r in seen]


def probe_residuals(model: str, labels, latents, steps: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The first block's residual (its hidden-states output minus input) and its hidden-states input (the block
    stack's input) at every step of the untouched run."""
    pipe = models.load(model)
    block = pipe.transformer.transformer_blocks[0]
    seen: list[torch.Tensor] = []
    inputs: list[torch.Tensor] = []

    def hook(module, args, kwargs, output):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        out = output[1] if isinstance(output, tuple) else output  # Flux's dual block: (encoder, hidden)
        seen.append((out - hidden).detach().reshape(out.shape[0], -1).float().clone())
        inputs.append(hidden.detach().reshape(out.shape[0], -1).float().clone())

    handle = block.register_forward_hook(hook, with_kwargs=True)
    try:
        sample_images(pipe, labels, latents, steps)
    finally:
        handle.remove()
    assert len(seen) == steps
    return seen, inputs


def preset_run(model: str, labels, latents, steps: int, preset: str):
    pipe = models.load(model)
    tcpade_fx.compile(pipe, policy=preset)
    sample_images(pipe, labels, latents, steps)
    stats = pipe.tcpade.stats
    return stats.decisions(0), [r.error_estimate for r in stats.records], pipe.tcpade.policy


def per_sample_error(actual: torch.Tensor, predicted: torch.Tensor, batch: int) -> np.ndarray:
    """‖a − p‖ / ‖a‖ per sample: rows i and i + batch are sample i's conditional and unconditional branches."""
    rows = actual.shape[0]
    groups = [list(range(i, rows, batch)) for i in range(batch)]
    out = []
    for g in groups:
        a, p = actual[g].reshape(-1), predicted[g].reshape(-1)
        out.append(float(torch.linalg.vector_norm(a - p) / torch.linalg.vector_norm(a).clamp_min(1e-30)))
    return np.array(out)


def predict(times, history, target, policy: Policy, method: str = "pade") -> torch.Tensor:
    """The runtime's extrapolant on ``history`` (Padé [L/1], L = nodes − 2 up to the policy's order), or with
    ``method="taylor"`` its b = 0 polynomial on the same nodes (order L, the newest L + 1 nodes)."""
    order = min(max(len(history) - 2, 0), policy.order)
    return extrapolate(times, history, target, method=method, order=order)


def study(model: str, steps: int, preset: str, labels, latents, full, probes, inputs) -> dict:
    times, residuals = full
    schedule, estimates, policy = preset_run(model, labels, latents, steps, preset)
    batch = len(labels)
    computed: list[int] = []
    rows = []  # one per predicted step: dict of per-sample arrays
    for k, c in enumerate(schedule):
        if c == "C":
            computed.append(k)
            continue
        nodes = computed[-policy.history_size:]
        t_nodes = [times[j] for j in nodes]
        pade = predict(t_nodes, [residuals[j] for j in nodes], times[k], policy)
        taylor = predict(t_nodes, [residuals[j] for j in nodes], times[k], policy, method="taylor")
        probe = predict(t_nodes, [probes[j] for j in nodes], times[k], policy)
        span = max(abs(t_nodes[-1] - t_nodes[0]), 1e-12)
        given = predict(t_nodes, [inputs[j] for j in nodes], times[k], policy)
        rows.append({
            "step": k,
            "actual": per_sample_error(residuals[k], pade, batch),
            "embedded": per_sample_error(pade, taylor, batch),
            "probe": per_sample_error(probes[k], probe, batch),
            "controller": np.full(batch, np.nan if estimates[k] is None else estimates[k]),
            "gap": np.full(batch, abs(times[k] - t_nodes[-1]) / span),
            "input": per_sample_error(inputs[k], given, batch),
            "input change": per_sample_error(inputs[nodes[-1]], inputs[k], batch),
        })
    result = {"model": model, "steps": steps, "preset": preset, "schedule": schedule, "predicted": len(rows)}
    for signal in SIGNALS:
        within, across = [], []
        for i in range(batch):  # within one trajectory: over its predicted steps
            x = np.array([r[signal][i] for r in rows])
            y = np.array([r["actual"][i] for r in rows])
            keep = np.isfinite(x)
            if keep.sum() >= 3 and np.ptp(x[keep]) > 0:
                within.append(spearmanr(x[keep], y[keep]).statistic)
        for r in rows:  # across the samples at one step
            if np.isfinite(r[signal]).all() and np.ptp(r[signal]) > 0:
                across.append(spearmanr(r[signal], r["actual"]).statistic)
        result[signal] = {"within": float(np.mean(within)) if within else math.nan,
                          "within_n": len(within),
                          "across": float(np.mean(across)) if across else math.nan,
                          "across_n": len(across)}
    result["actual_median"] = float(np.median(np.concatenate([r["actual"] for r in rows])))
    result["embedded_median"] = float(np.median(np.concatenate([r["embedded"] for r in rows])))
    return result


def report(results: list[dict], samples: int) -> str:
    lines = [
        "| model | N | preset | predicted steps | " + " | ".join(f"{s}: within / across" for s in SIGNALS) + " |",
        "|---|---|---|---|" + "---|" * len(SIGNALS),
    ]
    for r in results:
        cells = []
        for s in SIGNALS:
            v = r[s]
            fmt = lambda x: "—" if math.isnan(x) else f"{x:+.2f}"  # noqa: E731
            cells.append(f"{fmt(v['within'])} / {fmt(v['across'])}")
        lines.append(f"| {r['model']} | {r['steps']} | {r['preset']} | {r['predicted']} | " + " | ".join(cells) + " |")
    lines += ["", f"Spearman rank correlation with the actual (teacher-forced) error of each predicted step; "
              f"{samples} held-out seeds (2000..), guidance {GUIDANCE}. 'within': mean over samples of the "
              "correlation over a trajectory's predicted steps; 'across': mean over predicted steps of the "
              "correlation over samples. The controller's estimate is one value per batch (no 'across').", "",
              "| model | N | preset | schedule | median actual error | median embedded signal |",
              "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['steps']} | {r['preset']} | `{r['schedule']}` | "
                     f"{r['actual_median']:.3g} | {r['embedded_median']:.3g} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--models", nargs="+", default=["mnist-dit", "mnist-flux"])
    ap.add_argument("--steps", nargs="+", type=int, default=[20, 28])
    ap.add_argument("--presets", nargs="+", default=["balanced", "fast"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = list(range(2000, 2000 + args.samples))
    labels = [s % 10 for s in seeds]
    latents = metrics.seeded_latents(seeds)
    results = []
    for model, steps in itertools.product(args.models, args.steps):
        full = full_residuals(model, labels, latents, steps)
        probes, inputs = probe_residuals(model, labels, latents, steps)
        for preset in args.presets:
            results.append(study(model, steps, preset, labels, latents, full, probes, inputs))
            print(results[-1], flush=True)
    text = report(results, args.samples)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
