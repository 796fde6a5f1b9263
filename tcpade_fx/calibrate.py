"""Choose, on the user's own pipeline, what a preset forecasts: measured against the full run, not guessed.

    choice = tcpade_fx.calibrate(pipe, {"prompt": prompts, "num_inference_steps": 28}, policy="balanced")
    print(choice)                                   # every candidate's PSNR vs the full run, and the pick
    tcpade_fx.compile(pipe, policy=choice.policy)

Which forecast is closest to the full run depends on the model: on the bundled mnist-wan at 28 steps the outputs
of every block's attention and feed-forward modules forecast with Taylor-1 beat the shipped whole-stack TC-Padé on
84 % of 100 clips (+1.0 dB), on the bundled image models they lose in most cells (bench/GRANULARITY_STUDY.md). A
step-local error cannot tell them apart (bench/ADAPTIVE_STUDY.md section 7), the final sample can: calibration
runs the call once in full and once per candidate (each on the preset's plan, so at its compute), and keeps the
preset unless a candidate brings most samples closer to the full run (by a median ``margin`` dB, on ``agreement``
of them) at no more compute and no more than ``time_slack`` more time: a forecast of every module moves 2–3·L times the stack residual's data through the history
at every step, which on a narrow model costs more than it saves (mnist-wan, width 128, 28 steps, CPU: 1.05x where the
stack forecast runs 2.18x; at width 1536 the module forecast reaches 88 % of the ideal on the same CPU,
bench/STEP_COST.md).

Cost: the call twice in full and twice per candidate (an untimed warm-up that captures, then the measured run).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from . import metrics
from .api import compile, disable
from .integration import installed_runtime, output_samples
from .policy import Policy, resolve_policy

#: Extra compute (fraction of calls) a candidate may take over the preset and still be compared with it.
COMPUTE_SLACK = 0.02


def calibration_candidates(policy: Policy) -> list[tuple[str, Policy]]:
    """The forecasts :func:`calibrate` compares, each on ``policy``'s schedule settings: the policy itself, Taylor-1
    of the stack residual, the attention/feed-forward outputs of every block (``granularity="modules"``) with
    Taylor-1 and with the policy's own numerics, the policy with the other setting of ``input_gate`` (where
    the policy can run it: stack granularity, ``history_size >= 3``), and the policy with the other setting of
    ``gap_correction`` (0 or 1; where it applies: stack granularity without the gate). The correction gains on the
    bundled image models and loses on mnist-wan at 20 steps at any guidance or time shift measured
    (bench/ADAPTIVE_STUDY.md section 13): the final samples decide it per model.

    Not Taylor-2: it wins some 50-step cells but fails on a few samples in others (mnist-flux, 28 steps: median
    per-sample gain −0.16 dB, PSNR of the 100 samples −3.4 dB), which a calibration set of 8 does not see; pass it
    in ``candidates`` to compare it anyway."""
    taylor = dict(method="taylor", modulate_denominator=False, input_gate=False)
    found = [
        ("as given", policy),
        ("stack Taylor-1", policy.replace(**taylor)),
        ("modules Taylor-1", policy.replace(granularity="modules", gap_correction=0.0, **taylor)),
        ("modules, its numerics", policy.replace(granularity="modules", input_gate=False, gap_correction=0.0)),
    ]
    if policy.granularity == "stack" and policy.history_size >= 3:
        found.append(("without input gate" if policy.input_gate else "input gate",
                      policy.replace(input_gate=not policy.input_gate,
                                     gap_correction=policy.gap_correction if policy.input_gate else 0.0)))
    if policy.granularity == "stack" and not policy.input_gate:
        found.append(("without gap correction", policy.replace(gap_correction=0.0)) if policy.gap_correction
                     else ("gap correction", policy.replace(gap_correction=1.0)))
    return found


@dataclass(frozen=True)
class Candidate:
    """One measured forecast: PSNR of its outputs vs the full run's (dB, over the whole call), its computed fraction
    of transformer calls, the schedule of its first branch, its run's wall time over the full run's, and per sample
    (image or clip) the gain in dB over the first candidate's (PSNR of the sample vs the full run's, difference)."""

    name: str
    policy: Policy
    psnr: float
    compute: float
    schedule: str
    time_ratio: float = float("nan")  # seconds / the full run's seconds (after a warm-up each)
    gains: tuple[float, ...] = ()

    @property
    def median_gain(self) -> float:
        """Median per-sample gain over the first candidate (dB)."""
        return float(torch.tensor(self.gains, dtype=torch.float64).median()) if self.gains else 0.0

    @property
    def share_better(self) -> float:
        """Fraction of the samples this candidate brings closer to the full run than the first candidate does."""
        return sum(g > 0 for g in self.gains) / len(self.gains) if self.gains else 0.0


@dataclass(frozen=True)
class Calibration:
    """What :func:`calibrate` measured and chose; ``policy`` is the one to compile with."""

    policy: Policy
    chosen: str
    candidates: tuple[Candidate, ...]
    margin: float
    agreement: float = 0.75
    time_slack: float | None = None

    def __str__(self) -> str:
        width = max(len(c.name) for c in self.candidates)
        slack = "" if self.time_slack is None else f", at most {100 * self.time_slack:g} % more time"
        lines = [f"TC-Padé calibration (keeps {self.candidates[0].name!r} unless another gains a median "
                 f"{self.margin:g} dB per sample on at least {100 * self.agreement:g} % of the samples and on the "
                 f"whole call, at no more compute{slack}):"]
        for c in self.candidates:
            mark = "->" if c.name == self.chosen else "  "
            lines.append(f" {mark} {c.name:<{width}}  {c.psnr:6.2f} dB  median gain {c.median_gain:+.2f} dB on "
                         f"{100 * c.share_better:3.0f} % better  compute {c.compute:.2f}  time {c.time_ratio:.2f} of "
                         f"full  {c.schedule}")
        return "\n".join(lines)


def choose(candidates: Sequence[Candidate], margin: float = 0.25, agreement: float = 0.75,
           time_slack: float | None = 0.1) -> Candidate:
    """The first candidate (the policy as given), unless another one, at most :data:`COMPUTE_SLACK` more compute
    and (``time_slack`` not None) a time ratio at most ``1 + time_slack`` times the first's, brings at least
    ``agreement`` of the samples closer to the full run, by a median gain above ``margin`` dB, and the whole call
    too (a higher PSNR): then the one with the highest median gain (the earliest on a tie).

    Per-sample statistics, not the PSNR of the whole call: that one is the log of a mean squared error, which the
    worst one or two samples of a small calibration set decide (measured: with 8 samples and the call's PSNR the
    choice lost 0.1–2.3 dB to the shipped presets on the benchmark's 100 samples in 8 of 10 image-model cells,
    bench/ADAPTIVE_STUDY.md section 8)."""
    base = candidates[0]
    eligible = [c for c in candidates[1:] if c.compute <= base.compute + COMPUTE_SLACK
                and (time_slack is None or c.time_ratio <= base.time_ratio * (1 + time_slack))
                and c.median_gain > margin and c.share_better >= agreement and c.psnr > base.psnr]
    if not eligible:
        return base
    return max(eligible, key=lambda c: c.median_gain)  # max keeps the first of equal values


def _run(pipe, call: dict, seed: int) -> tuple[torch.Tensor, float]:
    """The call's outputs and the seconds of its second run (the first captures, verifies and compiles)."""
    seconds = 0.0
    for _ in range(2):
        generator = torch.Generator(device=pipe.device).manual_seed(seed)
        if pipe.device.type == "cuda":
            torch.cuda.synchronize(pipe.device)
        start = time.perf_counter()
        with torch.inference_mode():
            output = pipe(**call, generator=generator, output_type="np")
        if pipe.device.type == "cuda":
            torch.cuda.synchronize(pipe.device)
        seconds = time.perf_counter() - start
    return output_samples(output, torch.float64), seconds


def _sample_mse(full: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return ((out - full) ** 2).flatten(1).mean(1).clamp_min(1e-20)


def calibrate(
    pipe,
    call: dict,
    *,
    policy: Policy | str = "balanced",
    seed: int = 0,
    candidates: Sequence[tuple[str, Policy]] | None = None,
    margin: float = 0.25,
    agreement: float = 0.75,
    time_slack: float | None = 0.1,
    backend: str = "eager",
) -> Calibration:
    """Run ``pipe(**call)`` in full and with each candidate forecast (:func:`calibration_candidates` of
    ``policy`` by default), and choose the one closest to the full run (:func:`choose`).

    Args:
        pipe: a diffusers pipeline, not compiled with tcpade_fx (it is left as it was found).
        call: the pipeline call to calibrate on (conditioning, ``num_inference_steps``, guidance, ...): use the
            step count and guidance you will serve with, and a few typical prompts. Every run gets a fresh
            generator seeded with ``seed`` and ``output_type="np"``.
        policy: the preset or Policy whose schedule the candidates share.
        candidates: ``(name, policy)`` pairs to compare instead; the first is the one kept without a clear win.
        margin: median dB per sample a candidate must gain over the first to be chosen (calibration prompts are
            few: a small lead is noise).
        agreement: the share of the samples a candidate must bring closer to the full run than the first does.
        time_slack: how much longer than the first a candidate's run may take (0.1: 10 %); None chooses by
            PSNR and compute alone. Times are one run each after a warm-up: calibrate on the device and backend
            you serve with, on a quiet machine.
        backend: the backend to calibrate with (times depend on it).

    Raises:
        ValueError: ``call`` holds ``generator`` or ``output_type`` (calibration sets both), or no candidates.
        RuntimeError: the pipeline is already compiled with tcpade_fx (``tcpade_fx.disable(pipe)`` first).
    """
    given = [k for k in ("generator", "output_type") if k in call]
    if given:
        raise ValueError(f"calibrate sets {given} itself (every run starts from the same seed); remove them from "
                         "the call and pass seed= instead")
    if installed_runtime(pipe) is not None:
        raise RuntimeError("the pipeline is already compiled with tcpade_fx: tcpade_fx.disable(pipe) first, then "
                           "calibrate, then tcpade_fx.compile(pipe, policy=choice.policy)")
    base = resolve_policy(policy)
    pairs = list(candidates) if candidates is not None else calibration_candidates(base)
    if not pairs:
        raise ValueError("calibrate needs at least one candidate")
    full, full_seconds = _run(pipe, call, seed)
    measured: list[Candidate] = []
    first_mse = None
    for name, candidate in pairs:
        compile(pipe, policy=candidate, backend=backend)
        try:
            out, seconds = _run(pipe, call, seed)
            stats = pipe.tcpade.stats
            fraction = stats.computed / max(1, len(stats.records))
            schedule = stats.decisions(0)
        finally:
            disable(pipe)
        mse = _sample_mse(full, out)
        first_mse = mse if first_mse is None else first_mse
        gains = tuple(float(g) for g in 10 * torch.log10(first_mse / mse))
        measured.append(Candidate(name, candidate, metrics.psnr(full, out), fraction, schedule,
                                  seconds / full_seconds, gains))
    pick = choose(measured, margin, agreement, time_slack)
    named = pick.policy if pick is measured[0] else dataclasses.replace(pick.policy, name=f"{base.name}, {pick.name}")
    return Calibration(policy=named, chosen=pick.name, candidates=tuple(measured), margin=margin,
                       agreement=agreement, time_slack=time_slack)


__all__ = ["COMPUTE_SLACK", "Calibration", "Candidate", "calibrate", "calibration_candidates", "choose"]
