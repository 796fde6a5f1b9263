"""The per-step state machine that decides, for each denoising step, whether to compute the block stack or to
predict its residual; framework-light (floats in, decisions out) so it is testable without a model.

Error model (error-controlled step-size selection, as in adaptive ODE solvers). An extrapolant built on the
nodes ``t_1..t_n`` errs at ``t`` by about ``C·ω(t)``, ``ω(t) = Π_j |t − t_j|`` (the interpolation remainder:
n = L + 2 nodes for Padé [L/1], L + 1 for Taylor-L). At every computed step k the runtime tells us the a-posteriori
relative error ``e_k`` of what we would have predicted there; the Trajectory Stability Indicator is
``TSI_k = e_k / ω_k(t_k)``, our estimate of C. After a computed step we keep predicting while the run's
accumulated estimate ``Σ TSI·ω(t)`` stays within the stage tolerance and the run stays within ``max_skip``.

Budget plan: with a compute budget and a known number of steps, the budget is laid out along the trajectory as a
plan whose gaps grow with progress (computes at ``P(x) = w − 1 + (N − w)·x^γ`` for evenly spaced ``x``, ``w`` the
warm-up, ``γ`` the policy's ``budget_warp``, flattened on a schedule of unequal steps: ``StepController.warp``),
re-planned with the remaining budget after every computed step. On
the bundled trained models a greedy "compute whenever the estimate is above tolerance and the budget allows"
spent the budget early, left uneven node spacing (an extrapolation far beyond the spacing of its nodes) and lost
3–4 dB to such a plan at equal compute (bench/SCHEDULE_STUDY.md). The error estimate then moves the plan: a
trajectory transition with the estimate above tolerance computes before the planned step, an estimate within
tolerance at a planned step postpones it (each within ``max_skip``, and only where the gap it opens is no longer
than the re-plan's next one: the plan's gaps never shrink), and the re-plan spreads what is left.

Adaptive coefficient modulation has two parts. The runtime (not this controller: it needs the tensors) fits, after
every computed step, how far the prediction should follow Padé's denominator: μ in ``T + μ·(P − T)``, P the Padé
and T its b = 0 polynomial prediction of the residual just computed (least squares per sample, clipped to [0, 1],
a running average; Policy.modulate_denominator, bench/MODULATION_STUDY.md). And the controller damps: ``TSI_k``
above ``rise_factor`` × its running level (at the same order), or a normalised residual velocity
``‖R_k − R_{k−1}‖ / (‖R_{k−1}‖·|t_k − t_{k−1}|)`` above ``rise_factor`` × its running level, marks a trajectory
transition. Only then (METHOD.md: damping hurts Padé on smooth stretches) the prediction
is damped toward the last residual, ``λ = max(λ_min, rise_factor·TSI_level / TSI_k)``, and the next run is limited
to half the stage's ``max_skip``. The rise is judged on the horizon-normalised ``TSI_k``, not on the raw ``e_k``:
``e_k`` grows like ``ω_k`` with the length of the run that preceded step k, so comparing raw errors flagged a
"transition" after every run longer than the one before, even on a trajectory with a constant error constant
(found by the property tests: it made the compute fraction non-monotone in the tolerance). TSIs of different
orders have different units (``ω`` has ``L + 2`` or ``L + 1`` factors), so the level restarts when the order changes.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

from .pade import effective_order, needed_nodes
from .policy import Policy


def step_length_ratio(step_sizes: Sequence[float] | None) -> float:
    """The shortest of a schedule's step lengths over the longest (1: equal steps, or unknown lengths). Within
    0.1 % of 1 counts as 1: a float32 time grid of equal steps is not exactly even."""
    sizes = [abs(float(v)) for v in step_sizes or ()]
    if len(sizes) < 2 or not all(math.isfinite(v) for v in sizes) or max(sizes) <= 0:
        return 1.0
    ratio = min(sizes) / max(sizes)
    return 1.0 if ratio >= 0.999 else ratio


@dataclass(frozen=True)
class Decision:
    """What the controller decided for one step, and why."""

    step: int
    time: float | None  # None only while a step decided before its time was read (see decides_without_time)
    compute: bool
    stage: str
    reason: str
    order: int
    damping: float = 1.0
    tsi: float | None = None
    error_estimate: float | None = None
    tolerance: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


class StepController:
    """Decides compute-or-predict per step for one trajectory (one CFG branch).

    Usage per step: ``d = ctl.decide(i, t)``; after a computed step call ``ctl.record_compute(i, t, e, v)`` with
    the a-posteriori error ``e`` of the prediction of order ``d.order`` (None when there was no history) and the
    normalised residual velocity ``v`` (None for the first point); after a predicted step ``ctl.record_predict()``.
    """

    def __init__(self, policy: Policy, num_steps: int | None = None, step_sizes: Sequence[float] | None = None):
        self.policy = policy
        self.reset(num_steps, step_sizes)

    def reset(self, num_steps: int | None = None, step_sizes: Sequence[float] | None = None) -> None:
        """Start a new trajectory of ``num_steps`` steps (None: unknown, progress is taken from the times).

        ``step_sizes``: the scheduler's step lengths ``|t_j − t_{j+1}|`` (e.g. from its sigmas); on a schedule of
        unequal steps the plan's warp is flattened (:attr:`warp`, Policy.step_size_weight). None: equal steps."""
        if num_steps is not None and num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.num_steps = num_steps
        #: the budget plan's warp exponent: the policy's ``budget_warp`` on equal steps, flattened towards 1 as the
        #: steps grow unequal, ``1 + (γ − 1)·ρ^β`` with ``ρ`` the shortest step over the longest and ``β`` the
        #: policy's ``step_size_weight``. A time-shifted schedule (SD3 / FLUX / Wan ``shift`` 3: ρ ≈ 0.12) already
        #: packs its steps where the trajectory bends, so the plan's gaps need grow less (bench/SCHEDULE_STUDY.md)
        ratio = step_length_ratio(list(step_sizes)[: num_steps - 1] if step_sizes and num_steps else None)
        self.warp = 1.0 + (self.policy.budget_warp - 1.0) * ratio ** self.policy.step_size_weight
        self.first_time: float | None = None
        self.first_step = 0  # the trajectory's first step (img2img pipelines start part-way into the schedule)
        self.computed_times: deque[float] = deque(maxlen=self.policy.history_size)
        self.run_length = 0
        self.run_error = 0.0
        self.tsi: float | None = None
        self.tsi_level: float | None = None  # running level of the TSI, at order ``tsi_order``
        self.tsi_order: int | None = None
        self.velocity_level: float | None = None
        self.damping = 1.0
        self.transition = False
        self.first_mid_step: int | None = None
        self.computed = 0
        self.decisions: list[Decision] = []
        self.planned: set[int] = set()
        self.warmup: int | None = None

    # -- stage ---------------------------------------------------------------------------------------------
    def progress(self, step: int, time: float) -> float:
        if self.num_steps is not None:
            return 1.0 if self.num_steps == 1 else step / (self.num_steps - 1)
        if self.first_time is None or self.first_time == 0:
            return 0.0
        return min(1.0, max(0.0, 1.0 - time / self.first_time))

    def stage(self, step: int, time: float) -> str:
        s = self.progress(step, time)
        if s < self.policy.early_end:
            return "early"
        return "late" if s >= self.policy.late_start else "mid"

    def _stage_max_skip(self, stage: str) -> int:
        return self.policy.late_max_skip if stage == "late" else self.policy.mid_max_skip

    def _stage_order(self, stage: str) -> int:
        return self.policy.late_order if stage == "late" else self.policy.order

    def _omega(self, time: float, order: int) -> float:
        nodes = list(self.computed_times)[-needed_nodes(self.policy.method, max(order, 0)):]
        if order < 0:
            nodes = nodes[-1:]
        return math.prod(abs(time - tj) for tj in nodes)

    # -- decision -------------------------------------------------------------------------------------------
    @property
    def decides_without_time(self) -> bool:
        """Whether :meth:`decide` can run before the step's time is known (``time=None``): the trajectory's length
        is known (the stage comes from the step count) and there is no history, so every path computes. The time
        then comes with :meth:`record_compute` (the runtime reads it with the step's other statistics)."""
        return self.num_steps is not None and not self.computed_times

    def decide(self, step: int, time: float | None) -> Decision:
        """Decide step ``step`` at model time ``time``; the decision is also appended to ``self.decisions``.
        ``time`` may be None where :attr:`decides_without_time`."""
        p = self.policy
        if time is None and not self.decides_without_time:
            raise ValueError("decide(step, None) needs a known num_steps and no history (decides_without_time)")
        if not self.decisions:
            self.first_step = step
        if self.first_time is None and time is not None:
            self.first_time = float(time)
        stage = self.stage(step, time)
        have = len(self.computed_times)
        order = effective_order(p.method, self._stage_order(stage), have) if have else -1
        common = dict(step=step, time=None if time is None else float(time), stage=stage, order=order)

        def done(compute: bool, reason: str, **extra) -> Decision:
            d = Decision(compute=compute, reason=reason, **common, **extra)
            self.decisions.append(d)
            return d

        if p.schedule == "explicit":
            if step >= len(p.mask) or p.mask[step] == "C" or have == 0:
                return done(True, "explicit schedule" if have else "no history")
            return done(False, "explicit schedule")
        is_last = self.num_steps is not None and step >= self.num_steps - 1
        if self.num_steps is not None and self.num_steps < p.min_steps:
            return done(True, "few steps")
        if is_last and p.compute_last_step:
            return done(True, "last step")
        if stage == "early":
            return done(True, "early stage")
        if have == 0:
            return done(True, "no history")
        if self.first_mid_step is None:
            self.first_mid_step = step
            if self._planning:
                self.warmup = step
                self._replan(step - 1)
        if p.schedule == "fixed":
            if (step - self.first_mid_step) % p.interval == 0:
                return done(True, f"fixed schedule (every {p.interval})")
            return done(False, f"fixed schedule (every {p.interval})", damping=1.0)

        max_skip = self._stage_max_skip(stage)
        tol = p.late_tolerance if stage == "late" else p.mid_tolerance
        if self.transition and not (self._planning and self._no_budget_for_an_extra_compute(step)):
            max_skip = max_skip // 2
        if self.run_length >= max_skip:
            return done(True, f"max skip {max_skip} reached", tolerance=tol, tsi=self.tsi)
        estimate = None if self.tsi is None else self.run_error + self.tsi * self._omega(time, order)
        if self._planning:
            return self._planned_decision(step, estimate, tol, done)
        if estimate is None or not math.isfinite(estimate) or estimate > tol:
            why = "no error estimate yet" if estimate is None else "error estimate above tolerance"
            if self._budget_allows(step, time):
                return done(True, why, tsi=self.tsi, error_estimate=estimate, tolerance=tol)
            return done(False, why + ", but the compute budget is spent", damping=self.damping, tsi=self.tsi,
                        error_estimate=estimate, tolerance=tol)
        return done(False, "error estimate within tolerance", damping=self.damping, tsi=self.tsi,
                    error_estimate=estimate, tolerance=tol)

    # -- budget plan ----------------------------------------------------------------------------------------
    @property
    def _planning(self) -> bool:
        p = self.policy
        return p.compute_budget is not None and self.num_steps is not None and p.schedule == "adaptive"

    def _budget_total(self) -> int:
        """The budget of the steps this trajectory runs: all N, or those from its first step on."""
        return math.ceil(self.policy.compute_budget * (self.num_steps - self.first_step))

    def _warp(self, x: float) -> float:
        w, n = self.warmup, self.num_steps
        return (w - 1) + (n - w) * x ** self.warp

    def _replan(self, after: int) -> None:
        """Lay the budget left after step ``after`` on the steps after it, along the warped progress.

        The gaps between planned computations follow the warp's continuous gaps, rounded by largest remainder
        and sorted so that they never shrink: an extrapolation far beyond the spacing of its own nodes (a short
        gap followed by a long one) costs more than the warp gains. Computations that ``max_skip`` will force
        anyway count against the budget: the plan shrinks until plan and forced ones fit.
        """
        budget_left = self._budget_total() - self.computed
        self.planned = set()
        for points in range(budget_left, 0, -1):
            plan = self._lay_out(after, points)
            if len(plan | self._forced_after(after, plan)) <= budget_left:
                self.planned = plan
                return

    def _no_budget_for_an_extra_compute(self, step: int) -> bool:
        """Whether computing ``step`` off the plan would leave too little for what is forced after it."""
        return self.computed + 1 + len(self._forced_after(step, set())) > self._budget_total()

    def _forced_after(self, after: int, plan: set[int]) -> set[int]:
        """Steps after ``after`` that the last-step rule or ``max_skip`` would compute besides ``plan``."""
        p, n = self.policy, self.num_steps
        forced, run = set(), 0
        for j in range(after + 1, n):
            cap = self._stage_max_skip(self.stage(j, 0.0))
            if j in plan:
                run = 0
            elif (j == n - 1 and p.compute_last_step) or run >= cap:
                forced.add(j)
                run = 0
            else:
                run += 1
        return forced

    def _lay_out(self, after: int, points: int) -> set[int]:
        """``points`` computations in (after, n − 1], the last one at n − 1, gaps growing along the warp."""
        n, w, p = self.num_steps, self.warmup, self.policy
        span = n - 1 - after
        if span <= 0 or points <= 0:
            return set()
        if points >= span:
            return set(range(after + 1, n))
        x0 = min(1.0, max(0.0, (after - (w - 1)) / max(n - w, 1))) ** (1.0 / self.warp)
        ends = [after] + [self._warp(x0 + (1.0 - x0) * j / points) for j in range(1, points + 1)]
        ends[-1] = n - 1  # exactly, whatever the float warp gives
        exact = [b - a for a, b in zip(ends, ends[1:])]
        gaps = [max(1, math.floor(d)) for d in exact]
        order = sorted(range(points), key=lambda j: exact[j] - math.floor(exact[j]), reverse=True)
        k = 0
        while sum(gaps) < span:
            gaps[order[k % points]] += 1
            k += 1
        while sum(gaps) > span:  # the max(1, ·) floor overshot: take from the largest gaps
            gaps[max(range(points), key=lambda j: gaps[j])] -= 1
        gaps.sort()
        self._fit_gaps_to_stages(after, gaps)
        return set(itertools.accumulate(gaps, initial=after)) - {after}

    def _fit_gaps_to_stages(self, after: int, gaps: list[int]) -> None:
        """Shorten gaps that a stage's ``max_skip`` would cut anyway (a forced computation off the plan would
        overspend the budget) and lengthen the earlier ones with what they give up, where their stage allows."""

        def cap(end: int) -> int:
            return self._stage_max_skip(self.stage(end - 1, 0.0)) + 1

        for _ in range(len(gaps)):
            ends = list(itertools.accumulate(gaps, initial=after))[1:]
            caps = [cap(e) for e in ends]
            excess = sum(max(0, g - c) for g, c in zip(gaps, caps))
            if excess == 0:
                return
            gaps[:] = [min(g, c) for g, c in zip(gaps, caps)]
            while excess > 0:
                room = [k for k in range(len(gaps)) if gaps[k] < caps[k]]
                if not room:
                    gaps[-1] += excess  # nothing can absorb it: max_skip will force computations there
                    return
                for k in reversed(room):
                    if excess == 0:
                        break
                    gaps[k] += 1
                    excess -= 1

    def _planned_decision(self, step: int, estimate: float | None, tol: float, done) -> Decision:
        extra = dict(tsi=self.tsi, error_estimate=estimate, tolerance=tol)
        within = estimate is not None and math.isfinite(estimate) and estimate <= tol
        if step in self.planned:
            if within:
                kept = self.planned
                self._replan(step)
                if self._gaps_keep_growing(step):
                    return done(False, "planned step postponed: error estimate within tolerance",
                                damping=self.damping, **extra)
                self.planned = kept
            return done(True, "budget plan", **extra)
        if self.transition and not within and not self._no_budget_for_an_extra_compute(step):
            return done(True, "trajectory transition: error estimate above tolerance", **extra)
        return done(False, "budget plan", damping=self.damping, **extra)

    def _gaps_keep_growing(self, step: int) -> bool:
        """Whether the plan re-laid after a postponed ``step`` keeps the gaps from shrinking: the gap the
        postponement opens (from the last computation to the re-plan's first) must not exceed the re-plan's next
        gap. A postponement that breaks this leaves a long extrapolation followed by short ones, what the plan is
        built to avoid (it cost 1–10 dB on mnist-dit at 50 steps, where the estimate postponed the first planned
        step after the warm-up: bench/ADAPTIVE_STUDY.md)."""
        replanned = sorted(self.planned)
        if len(replanned) < 2:
            return True
        last_computed = step - self.run_length - 1
        return replanned[0] - last_computed <= replanned[1] - replanned[0]

    def _budget_allows(self, step: int, time: float) -> bool:
        budget = self.policy.compute_budget
        if budget is None:
            return True
        if self.num_steps is None:
            return self.computed + 1 <= budget * (step + 1)
        return self.computed + 1 + self._reserve(step) <= self._budget_total()

    def _reserve(self, step: int) -> int:
        """Computes that max_skip limits and the last step will force after ``step`` (an upper estimate)."""
        p, n = self.policy, self.num_steps
        last = n - 1 if p.compute_last_step else n
        mid = late = 0
        for j in range(step + 1, last):
            if self.stage(j, 0.0) == "late":
                late += 1
            else:
                mid += 1
        forced = -(-mid // (p.mid_max_skip + 1)) + -(-late // (p.late_max_skip + 1))
        return forced + (1 if p.compute_last_step and step < n - 1 else 0)

    # -- feedback -------------------------------------------------------------------------------------------
    def record_predict(self) -> None:
        """A predicted step was taken with the last decision."""
        d = self.decisions[-1] if self.decisions else None
        self.run_length += 1
        if d is not None and d.error_estimate is not None:
            self.run_error = d.error_estimate

    def record_compute(
        self, step: int, time: float, prediction_error: float | None, velocity: float | None
    ) -> None:
        """A computed step: update the TSI, the modulation and the history times.

        ``prediction_error`` is the a-posteriori relative error of the prediction the controller would have made
        here (order ``decisions[-1].order``), ``velocity`` the normalised residual velocity.
        """
        p = self.policy
        d = self.decisions[-1] if self.decisions else None
        if d is not None and d.time is None:  # decided before its time was known (decides_without_time)
            d = self.decisions[-1] = replace(d, time=float(time))
        if self.first_time is None:
            self.first_time = float(time)
        order = d.order if d is not None else -1
        self.transition = False
        self.damping = 1.0
        if prediction_error is not None and math.isfinite(prediction_error) and self.computed_times:
            omega = self._omega(time, order)
            if omega > 0:
                tsi = prediction_error / omega
                self.tsi = tsi
                level = self.tsi_level if self.tsi_order == order else None
                if level is not None and tsi > p.rise_factor * level:
                    self.transition = True
                    self.damping = max(p.lambda_min, min(1.0, p.rise_factor * level / max(tsi, 1e-30)))
                a = p.error_smoothing
                self.tsi_level = tsi if level is None else a * tsi + (1 - a) * level
                self.tsi_order = order
        elif prediction_error is not None and not math.isfinite(prediction_error):
            self.tsi = None
        if velocity is not None and math.isfinite(velocity):
            vl = self.velocity_level
            if vl is not None and velocity > p.rise_factor * vl:
                self.transition = True
            a = p.error_smoothing
            self.velocity_level = velocity if vl is None else a * velocity + (1 - a) * vl
        self.computed_times.append(float(time))
        self.computed += 1
        self.run_length = 0
        self.run_error = 0.0
        if self._planning and self.warmup is not None and step not in self.planned:
            self._replan(step)  # a computation off the plan: spread what is left (a planned one keeps the plan)

    def clear_history(self) -> None:
        """Forget the history (a jump, a non-finite residual, a new input shape): the next step computes, later ones
        extrapolate from what the history holds by then (the budget plan is kept; forcing computes until the
        history refills overspent it: measured on the ControlNet jump of tests/test_jumps.py)."""
        self.computed_times.clear()
        self.tsi = None
        self.run_length = 0
        self.run_error = 0.0

    @property
    def compute_fraction(self) -> float:
        if not self.decisions:
            return 0.0
        return sum(d.compute for d in self.decisions) / len(self.decisions)
