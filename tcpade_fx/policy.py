"""Policies: every knob of TC-Padé in one frozen dataclass, plus the named presets users pick from.

A preset's name promises an outcome; :data:`PRESET_AIMS` states the fraction of block-stack steps each preset
aims to compute at 20–50 steps (the benchmark reports what it actually computes).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from .pade import needed_nodes
from .passes.units import GRANULARITIES

Method = Literal["pade", "taylor", "reuse"]
Schedule = Literal["adaptive", "fixed", "explicit"]
Granularity = Literal["stack", "modules"]
GapSpace = Literal["sample", "residual"]
GAP_SPACES: tuple[str, ...] = ("sample", "residual")

METHODS: tuple[str, ...] = ("pade", "taylor", "reuse")
SCHEDULES: tuple[str, ...] = ("adaptive", "fixed", "explicit")
HistoryDtype = Literal["float32", "bfloat16", "float16", "model"]
HISTORY_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16", "model")
MAX_HISTORY = 4
MAX_ORDER = 2


@dataclass(frozen=True)
class Policy:
    """How TC-Padé decides between computing the block stack and predicting its residual.

    Numerics (see :mod:`tcpade_fx.pade`):
        method: ``"pade"`` (shared-denominator [L/1]), ``"taylor"`` (polynomial of order L, the b = 0 case)
            or ``"reuse"`` (last residual).
        order: L, the numerator degree used in the mid stage (0, 1 or 2).
        late_order: L used in the late stage.
        history_size: K, computed residuals kept (the fit uses the newest ``order + 2`` of them).
        per_sample: fit the denominator per batch element instead of once per tensor.
        eps: regulariser of the least-squares denominator fit (relative, data are normalised first).
        pole_margin: δ; the denominator ``1 + b·τ`` must stay above it between the oldest node and the target.
        history_dtype: the dtype the residual history is stored in: ``"float32"`` (default), ``"bfloat16"``,
            ``"float16"`` or ``"model"`` (the residual's own dtype, e.g. a bfloat16 model's). The fit and the
            weighted sum are float32 whatever it is; a narrower store halves the history's memory and costs
            quality (bench/HISTORY_DTYPE.md).
        granularity: what a predicted step predicts. ``"stack"`` (default): the residual of the whole block stack,
            one tensor of the hidden stream's size per branch. ``"modules"``: the outputs of every block's attention
            and feed-forward modules (diffusers' TaylorSeer units, :mod:`tcpade_fx.passes.units`); norms, adaLN,
            gates and residual adds still run on predicted steps. It keeps 2–3 tensors of the stream's size per
            block in the history (L blocks: 2–3·L times the stack's memory), captures static-shape graphs (one
            set per input shape) and cannot be exported. Measured (bench/GRANULARITY_STUDY.md): with
            ``method="taylor"`` it helps on long schedules (28–50 steps) and loses at 20.
        modulate_denominator: after each computed step, fit μ ∈ [0, 1] in ``T + μ·(P − T)`` (``P`` the Padé,
            ``T`` its b = 0 polynomial extrapolant on the same nodes) to the residual just computed, and predict
            with it until the next computed step (only for ``method="pade"``). Measured (bench/MODULATION_STUDY.md):
            +0.27 dB mean over plain Padé in 18 cells of both bundled models, better in 13, worse in 3.
        input_gate: on a predicted step the block stack's input x is known (the head ran): move the prediction
            toward the node weights that reproduce x from the inputs at the computed steps, as far as that fit
            explains x (:func:`~tcpade_fx.pade.input_gated_residual`). The history then keeps the stack inputs too
            (twice its memory) and the graphs carry them (the compute graph returns x, the predict graph takes
            the gate's terms; exports carry both, and a loader refuses to switch the gate or ``per_sample`` on graphs
            built otherwise). Needs ``granularity="stack"`` and ``history_size >= 3``; not with context parallelism
            (refused, saying so). Measured in bench/ADAPTIVE_STUDY.md section 10.
        gap_correction: κ ≥ 0 (0: off; the presets ship 1). A gap's predicted steps moved the sample by
            ``Σ_k h_k v̂_k``; once the computed step that ends the gap is known, the interpolant of the newest
            :data:`~tcpade_fx.pade.GAP_NODES` computed residuals re-estimates what each of them should have stepped
            with, and κ times the difference is cancelled, to first order, by a later step (where: see
            :attr:`gap_space`; the history keeps the computed residuals as they are). Each step's share is weighted by
            how much of an error made at noise level σ_k is still in the sample at σ_c (σ_c / σ_k: a flow sampler
            contracts errors off the data at that rate). Needs a sampler whose step is ``x + (σ_next − σ)·output``
            (FlowMatchEulerDiscreteScheduler without stochastic sampling, driven by a pipeline); with any other, or a
            bare transformer, it is not applied, with a note. Skipped where the interpolant would reach into the
            early stage. Applies to ``granularity="stack"`` without ``input_gate`` (the gate moves the prediction
            inside the predict graph, where the gap's sum cannot see it); otherwise it is not applied, with a note.
            Measured: bench/ADAPTIVE_STUDY.md sections 12–14.
        gap_span_limit: which gaps :attr:`gap_correction` corrects: only those with ``Δσ² / σ_c`` at most this, Δσ the
            gap's span in noise level (from the computed step before it to the computed step c that ends it) and σ_c
            the noise level at c (``math.inf``: every gap). A long gap at low noise is where the interpolant's error
            and the drift that the computed step's residual already carries (it was computed at the gap's drifted
            state) outweigh the error it corrects: measured per gap on mnist-dit and mnist-flux, the corrections of
            gaps at ``Δσ²/σ_c`` ≤ 0.12 gained and those at ≥ 0.22 lost (up to 1.7 dB in a cell)
            (bench/ADAPTIVE_STUDY.md section 13). The trajectory's last step is exempt (no computed step follows it
            for the drift to feed into; its correction measured −0.02 to +0.1 dB).
        gap_space: where :attr:`gap_correction` measures and cancels a gap's error. ``"sample"`` (default): at the
            computed step that ends the gap, each of the gap's predicted calls is run again through the predict graph
            (head and tail, no blocks) on its own inputs with the interpolated residual, ṽ_k, and
            ``κ·σ_c·Σ_k (h_k/σ_k)·(v̂_k − ṽ_k)`` is taken off this step's own output: the error the sample took,
            whatever the tail (its final norm, the step's own adaLN scale) does to a residual error at each step.
            One more predict-graph run per gap step, at the computed step (the inputs of the gap's calls are kept
            until then, not copied; one modified in place in the meantime skips that gap, with a note).
            ``"residual"``: the same sum in residual units, taken off the next predicted step's residual (the last
            step of a trajectory takes it itself with one more run of the predict graph): no extra runs, exact only
            where the tail maps a residual error alike at every step of the gap. Measured in bench/ADAPTIVE_STUDY.md
            section 14.
        modulation_smoothing: weight of the newest μ in its running value (1: the newest alone; 0.5 measured better
            on average, bench/modulation_variants.py).
        lambda_min: lower bound of the damping λ applied when the a-posteriori error rises.
        rise_factor: an error above ``rise_factor`` × its running level is a trajectory transition.
        error_smoothing: weight of the newest error in the running level (exponential average).
    Stages (progress s = i / (N − 1), or 1 − t / t_first without a known schedule):
        early_end: s below it is the early stage: every step computed.
        late_start: s at or above it is the late stage.
        mid_tolerance / late_tolerance: largest predicted relative residual error accepted.
        mid_max_skip / late_max_skip: longest run of predicted steps in that stage.
        compute_last_step: always compute the final step.
        min_steps: trajectories of fewer steps are computed in full (with a note): caching a distilled 4-step
            model costs quality for little gain. Lower it to cache short trajectories anyway.
    Jumps:
        jump_factor / jump_floor: a checked error above ``jump_factor`` × the median of the branch's recent checked
            errors and above ``jump_floor`` (relative) means what conditions the blocks changed regime (a ControlNet
            switching off, a guidance schedule): the branch's history restarts from that step, with a note.
    Budget:
        compute_budget: largest fraction of steps to compute (None: error control alone decides). Steps forced
            by the stages, ``max_skip`` and the last step are always computed; the tolerance spends the rest of
            the budget where the error estimate is largest, keeping in reserve what ``max_skip`` will force later.
            With a known number of steps the budget is laid out as a plan whose gaps grow with progress (see
            :mod:`tcpade_fx.controller`), which the error estimate moves.
        budget_warp: γ ≥ 1, how fast the planned gaps grow (1: even spacing; 1.3 measured best on the bundled
            models, bench/SCHEDULE_STUDY.md).
        step_size_weight: β ≥ 0, how far unequal scheduler steps flatten the warp: the plan uses
            ``1 + (γ − 1)·ρ^β``, ρ the shortest step length over the longest (StepController.warp). A time-shifted
            flow schedule (SD3 / FLUX / Wan ``shift`` 2–3, ρ ≈ 0.25 / 0.12) packs its short steps where the
            trajectory bends, and there flatter plans won; β = 0.5 beat β = 0 (the plain warp) in all 6 shifted
            cells of the held-out DiT and β = 1 on the tuning models in total (bench/SCHEDULE_STUDY.md). 0: the
            warp whatever the schedule; no effect on equal steps (shift 1) or unknown steps (a bare transformer).
    Schedule:
        schedule: ``"adaptive"`` (error-controlled horizon) or ``"fixed"`` (compute every ``interval``-th step
            after the early stage, the TaylorSeer/FORA-style baseline).
        interval: period of the fixed schedule (which ignores ``max_skip``, the tolerances and the budget: it is
            the baseline, computing every ``interval``-th step after the early stage, and the last step).
        mask: the explicit schedule, one character per step (``C`` compute, ``.`` predict), e.g. to replay another
            policy's schedule with a different extrapolant; steps beyond the mask are computed.
    """

    method: Method = "pade"
    granularity: Granularity = "stack"
    order: int = 1
    late_order: int = 1
    history_size: int = 3
    per_sample: bool = True
    eps: float = 1e-8
    pole_margin: float = 0.1
    history_dtype: HistoryDtype = "float32"
    modulate_denominator: bool = True
    modulation_smoothing: float = 0.5
    input_gate: bool = False
    gap_correction: float = 0.0
    gap_span_limit: float = 0.15
    gap_space: GapSpace = "sample"
    lambda_min: float = 0.5
    rise_factor: float = 2.0
    error_smoothing: float = 0.5
    early_end: float = 0.1
    late_start: float = 0.85
    mid_tolerance: float = 0.05
    late_tolerance: float = 0.02
    mid_max_skip: int = 3
    late_max_skip: int = 2
    compute_last_step: bool = True
    min_steps: int = 9
    jump_factor: float = 20.0
    jump_floor: float = 0.25
    compute_budget: float | None = None
    budget_warp: float = 1.3
    step_size_weight: float = 0.5
    schedule: Schedule = "adaptive"
    interval: int = 3
    mask: str | None = None
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        problems = []
        if self.method not in METHODS:
            problems.append(f"method={self.method!r} is not one of {METHODS}")
        if self.granularity not in GRANULARITIES:
            problems.append(f"granularity={self.granularity!r} is not one of {GRANULARITIES}")
        if self.history_dtype not in HISTORY_DTYPES:
            problems.append(f"history_dtype={self.history_dtype!r} is not one of {HISTORY_DTYPES}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule={self.schedule!r} is not one of {SCHEDULES}")
        for name in ("order", "late_order"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 0 <= v <= MAX_ORDER:
                problems.append(f"{name}={v!r} must be an int in [0, {MAX_ORDER}]")
        if not isinstance(self.history_size, int) or not 1 <= self.history_size <= MAX_HISTORY:
            problems.append(f"history_size={self.history_size!r} must be an int in [1, {MAX_HISTORY}]")
        for name in ("mid_max_skip", "late_max_skip"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                problems.append(f"{name}={v!r} must be an int >= 0")
        if isinstance(self.late_max_skip, int) and self.late_max_skip > 2:
            problems.append(f"late_max_skip={self.late_max_skip} must be <= 2 (the late stage changes fast)")
        if not isinstance(self.min_steps, int) or self.min_steps < 1:
            problems.append(f"min_steps={self.min_steps!r} must be an int >= 1")
        for name in ("jump_factor", "jump_floor"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0):
                problems.append(f"{name}={v!r} must be a number > 0 (math.inf turns jump detection off)")
        if not isinstance(self.interval, int) or self.interval < 1:
            problems.append(f"interval={self.interval!r} must be an int >= 1")
        for name in ("eps", "mid_tolerance", "late_tolerance"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                problems.append(f"{name}={v!r} must be a finite number >= 0")
        for name, lo, hi in (
            ("pole_margin", 0.0, 1.0),
            ("lambda_min", 0.0, 1.0),
            ("error_smoothing", 0.0, 1.0),
            ("modulation_smoothing", 0.0, 1.0),
            ("early_end", 0.0, 1.0),
            ("late_start", 0.0, 1.0),
        ):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and lo <= v <= hi):
                problems.append(f"{name}={v!r} must be in [{lo}, {hi}]")
        if self.compute_budget is not None and not (
            isinstance(self.compute_budget, (int, float)) and 0.0 < self.compute_budget <= 1.0
        ):
            problems.append(f"compute_budget={self.compute_budget!r} must be None or in (0, 1]")
        if not (isinstance(self.budget_warp, (int, float)) and 1.0 <= self.budget_warp <= 4.0):
            problems.append(f"budget_warp={self.budget_warp!r} must be in [1, 4]")
        if not (isinstance(self.step_size_weight, (int, float)) and 0.0 <= self.step_size_weight <= 2.0):
            problems.append(f"step_size_weight={self.step_size_weight!r} must be in [0, 2]")
        if not (isinstance(self.rise_factor, (int, float)) and self.rise_factor >= 1.0):
            problems.append(f"rise_factor={self.rise_factor!r} must be >= 1")
        if not problems and self.method in METHODS:
            need = needed_nodes(self.method, max(self.order, self.late_order))
            if self.history_size < need:
                problems.append(
                    f"history_size={self.history_size} keeps too few residuals for {self.method} of order "
                    f"{max(self.order, self.late_order)} (it needs {need}): raise history_size to {need} or lower "
                    "the order"
                )
        if not isinstance(self.input_gate, bool):
            problems.append(f"input_gate={self.input_gate!r} must be True or False")
        elif self.input_gate and self.granularity != "stack":
            problems.append("input_gate=True needs granularity='stack' (the gate fits the block stack's input)")
        elif self.input_gate and self.history_size < 3:
            problems.append(f"input_gate=True fits over 3 computed steps: raise history_size={self.history_size} to 3")
        if not (isinstance(self.gap_correction, (int, float)) and not isinstance(self.gap_correction, bool)
                and math.isfinite(self.gap_correction) and 0.0 <= self.gap_correction <= 2.0):
            problems.append(f"gap_correction={self.gap_correction!r} must be a number in [0, 2] (1: first-order "
                            "cancellation, 0: off)")
        elif self.gap_correction and self.history_size < 2:
            problems.append(f"gap_correction interpolates over computed steps: raise history_size={self.history_size} "
                            "to 2 or more")
        if not (isinstance(self.gap_span_limit, (int, float)) and not isinstance(self.gap_span_limit, bool)
                and self.gap_span_limit > 0):
            problems.append(f"gap_span_limit={self.gap_span_limit!r} must be a number > 0 (math.inf: correct every gap)")
        if self.gap_space not in GAP_SPACES:
            problems.append(f"gap_space={self.gap_space!r} is not one of {GAP_SPACES}")
        if not problems and self.early_end > self.late_start:
            problems.append(f"early_end={self.early_end} must not exceed late_start={self.late_start}")
        if self.schedule == "explicit" and (not isinstance(self.mask, str) or set(self.mask) - {"C", "."}):
            problems.append(f"schedule='explicit' needs mask= a string of 'C' and '.', got {self.mask!r}")
        if problems:
            raise ValueError("invalid TC-Padé policy: " + "; ".join(problems))

    @property
    def history_torch_dtype(self) -> "torch.dtype | None":
        """:attr:`history_dtype` as a torch dtype; None for ``"model"`` (the residual's own dtype)."""
        return None if self.history_dtype == "model" else getattr(torch, self.history_dtype)

    def replace(self, **changes) -> "Policy":
        """A copy with some fields changed (validated); the copy is named ``custom``."""
        changes.setdefault("name", "custom")
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str) -> "Policy":
        """One of the named presets: ``"quality"``, ``"balanced"``, ``"fast"`` (plus ``"full"``: compute all)."""
        if isinstance(name, Policy):
            return name
        try:
            return PRESETS[name]
        except (KeyError, TypeError):
            raise ValueError(
                f"unknown TC-Padé policy {name!r}; choose one of {sorted(PRESETS)} or pass a tcpade_fx.Policy(...)"
            ) from None


def resolve_policy(policy: "Policy | str") -> Policy:
    """Accept a preset name or a :class:`Policy`; anything else is a clear error."""
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, str):
        return Policy.preset(policy)
    raise TypeError(f"policy must be a preset name {sorted(PRESETS)} or a tcpade_fx.Policy, got {type(policy).__name__}")


#: Every preset corrects its gaps' integrals (Policy.gap_correction). "balanced" and "fast" only the gaps within
#: gap_span_limit (a long gap at low noise lost: at 20 and 28 steps "fast" lost 0.2–1.5 dB correcting every gap);
#: "quality", whose gaps are 1–2 steps, corrects every gap (on mnist-dit and mnist-flux at 20 steps the one gap the
#: limit skips cost 0.1 dB, 0.3 dB on the median sample; bench/ADAPTIVE_STUDY.md section 13).
PRESETS: dict[str, Policy] = {
    "quality": Policy(
        name="quality", early_end=0.15, mid_tolerance=0.02, late_tolerance=0.01, mid_max_skip=2, late_max_skip=1,
        compute_budget=0.55, gap_correction=1.0, gap_span_limit=math.inf,
    ),
    "balanced": Policy(name="balanced", compute_budget=0.40, gap_correction=1.0),
    "fast": Policy(
        name="fast", early_end=0.1, late_start=1.0, mid_tolerance=0.15, late_tolerance=0.05, mid_max_skip=5,
        late_max_skip=2, compute_budget=0.28, gap_correction=1.0,
    ),
    "full": Policy(name="full", mid_max_skip=0, late_max_skip=0),
}

#: Fraction of block-stack steps each preset aims to compute at 20–50 steps.
PRESET_AIMS: dict[str, float] = {"quality": 0.55, "balanced": 0.40, "fast": 0.28, "full": 1.0}
