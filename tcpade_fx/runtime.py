"""The stateful part of tcpade_fx: per-signature graph sets, per-branch histories and controllers, and the stats.

A :class:`TCPadeRuntime` drives one transformer. :mod:`tcpade_fx.integration` installs it as a diffusers hook
and calls :meth:`TCPadeRuntime.call` with the forward below the hook. On the first call with a new input
signature (tensor shapes, dtypes, devices and the non-tensor arguments) it builds the compute/predict graphs with
:func:`tcpade_fx.passes.build_graphs` and hands them to the backend (:mod:`tcpade_fx.backends`). Each call then:

1. finds the step and the guidance branch (one history per branch). A branch is the pipeline's
   ``cache_context`` name where it gives one ("cond", "uncond"), else the call's position within the step. In a
   pipeline the scheduler drives the steps (:meth:`TCPadeRuntime.begin` with its schedule): a call after the
   scheduler's ``step`` is the next step, at the scheduler's own step index (img2img starts part-way), further
   calls before it are further branches, and the time is the scheduler's exact grid where the model receives a
   float16/bfloat16 timestep. A bare transformer is read off the ``timestep`` argument: calls at the same time as
   the previous call are further branches, a new time is the next step, a time above the previous one starts a
   new trajectory (noted in the stats). An input signature that changes resets only that branch's history; the
   trajectory goes on;
2. asks the branch's :class:`~tcpade_fx.controller.StepController` to compute or predict;
3. computes (and checks what it would have predicted, feeding the a-posteriori error back; with
   ``Policy.modulate_denominator`` it also refits the modulation μ between Padé and its b = 0 polynomial,
   :func:`~tcpade_fx.pade.fit_modulation`) or predicts the residual with
   :func:`~tcpade_fx.pade.extrapolate_stacked` and runs the predict graph (with ``Policy.input_gate`` the graph
   moves it toward what the step's own stack input says, :func:`~tcpade_fx.pade.input_gated_residual`).

The compute/predict decision stays in Python, outside every graph, so each graph compiles once. The first call
of a signature is served by the verified compute graph's own outputs (one reference forward, one compute graph).

Host reads (each one a host sync on CUDA: bench/HOST_SYNCS.md). Driven by a pipeline, a predicted call reads nothing
and a computed call reads once (:func:`read_scalars`): the step's time is the scheduler's grid value (scaled to the
model's units by the first received time; the model's own value stays on the device and is checked at the next
read: a step whose time does not follow restarts the histories, with a note, and the times are read at every call
from then on); a prediction's non-finite batch rows are replaced on the device by the newest computed residual
(always finite: a computed residual is checked before it is stored), reported at the next read; the check's error,
velocity and modulation mean are read together with the residual's finiteness. Node times reach the device in one
non-blocking copy per extrapolation (:func:`tcpade_fx.pade.to_device`). What is still pending when the trajectory
ends is read when :attr:`TCPadeRuntime.stats` is read (outside the calls). A bare transformer (no pipeline) reads its
time off each call's ``timestep``: one read per call more.
"""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch.utils import _pytree as pytree

from .backends import get_backend
from .backends.registry import dtype_name
from .controller import StepController
from .distributed import DivergedDecisionError, ParallelContext, UnsupportedParallelismError, parallel_context
from .pade import (GAP_NODES, LOCAL, StatPack, StatReducer, denominator_partials, extrapolate_stacked,
                   gap_integral_weights, gap_miss, input_gate_terms,
                   input_gated_residual, modulation_from, modulation_partials, nonfinite_partial, relative_error_from,
                   relative_error_partials, replace_nonfinite_, weighted_sum)
from .model_state import ModelFingerprint, model_fingerprint
from .passes import (BlockStackPlan, ShapePlan, VerificationError, bind_call, build_graphs, check_rewrite, flatten_call,
                     time_argument)
from .passes.verify import eager_outputs
from .passes.dynamic import leaf_layout
from .policy import Policy


@dataclass
class StepRecord:
    """One transformer call: which step and branch, what was decided and how well it went."""

    step: int
    branch: int  # the branch's index in order of first appearance in the trajectory
    time: float
    computed: bool
    stage: str
    reason: str
    order: int
    damping: float
    modulation: float | None  # predicted steps with Policy.modulate_denominator: the μ used (batch mean)
    error_estimate: float | None
    check_error: float | None  # computed steps: relative error the prediction would have had here
    context: str | None = None  # the pipeline's cache_context name of the call ("cond", "uncond"), if any
    gap_corrected: bool = False  # computed steps: the preceding gap's integral error measured, for the next predicted
    # step (or, at the last step, this one) to cancel (Policy.gap_correction)


@dataclass
class TCPadeStats:
    """What the runtime did since the last reset: per-call records, notes (re-captures, resets), compile counts."""

    records: list[StepRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    compiles: dict[str, int] = field(default_factory=dict)
    captures: int = 0

    @property
    def computed(self) -> int:
        return sum(r.computed for r in self.records)

    @property
    def predicted(self) -> int:
        return sum(not r.computed for r in self.records)

    @property
    def compute_fraction(self) -> float:
        """Fraction of transformer calls that ran the block stack."""
        return self.computed / len(self.records) if self.records else 0.0

    @property
    def num_steps(self) -> int:
        return len({(r.step, r.time) for r in self.records})

    def decisions(self, branch: int | str = 0) -> str:
        """The schedule of a branch (its index, or its ``cache_context`` name) as a string: ``C`` computed,
        ``.`` predicted."""
        key = "context" if isinstance(branch, str) else "branch"
        return "".join("C" if r.computed else "." for r in self.records if getattr(r, key) == branch)

    def check_errors(self) -> list[float]:
        return [r.check_error for r in self.records if r.check_error is not None]

    def summary(self) -> str:
        errs = self.check_errors()
        lines = [
            f"TC-Padé: {self.computed}/{len(self.records)} transformer calls computed the block stack "
            f"({100 * self.compute_fraction:.1f} %), {self.predicted} predicted, over {self.num_steps} steps",
            f"  schedule (branch 0): {self.decisions(0)}",
        ]
        if errs:
            lines.append(
                f"  prediction error checked at computed steps: median {sorted(errs)[len(errs) // 2]:.3g}, "
                f"max {max(errs):.3g}"
            )
        if self.compiles:
            lines.append(f"  backend compiles: {self.compiles}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = summary

    def as_dict(self) -> dict:
        return {
            "computed": self.computed,
            "predicted": self.predicted,
            "compute_fraction": self.compute_fraction,
            "records": [vars(r) for r in self.records],
            "notes": list(self.notes),
            "compiles": dict(self.compiles),
        }


@dataclass
class GraphSet:
    """The callables the runtime steps with for one input signature (from the backend, or an export's files)."""

    plan: BlockStackPlan
    compute: Callable  # compute(*leaves) -> (*outputs, residual[, stack_input with Policy.input_gate])
    predict: Callable  # predict(*leaves, residual[, gate with Policy.input_gate]) -> outputs
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    timestep_position: int
    first_outputs: tuple | None = None  # the verified compute graph's outputs for the call that was captured
    shapes: ShapePlan | None = None  # dynamic axes: the graphs also run other sizes along them
    example: list | None = None  # the example leaves' layouts (passes.dynamic.leaf_layout), for ``accepts``
    verified: set = field(default_factory=set)  # exact signatures already checked against the eager forward
    capture_route: str = "torch.export"  # how the graphs were captured (passes.pipeline.Graphs.capture_route)
    input_gate: bool = False  # the graphs of Policy.input_gate (compute returns the stack input, predict takes the gate)

    def accepts(self, leaves: list) -> bool:
        return self.shapes is not None and self.example is not None and self.shapes.accepts(self.example, leaves)


@dataclass
class Branch:
    """One guidance branch's history: the newest ``history_size`` computed residuals, their times, and its controller.

    The residuals live in a static ring (:attr:`ring`, ``(K, B, F)`` with K = ``history_size``, B = batch with
    per-sample statistics else 1), allocated once per residual shape and updated in place (``copy_`` into the
    oldest slot): :attr:`slots` lists the slots in use, oldest first, and
    :func:`~tcpade_fx.pade.extrapolate_stacked` reads the ring through them. The predicted residual is written into
    :attr:`prediction`, also allocated once per shape. So the extrapolation and the predict graph see the same
    tensor storage every step (what CUDA graphs need). With ``Policy.input_gate`` the block stack's inputs at the
    same steps live in :attr:`inputs` (same layout and slots) and the gate's terms in :attr:`gate`."""

    controller: StepController
    index: int  # order of first appearance in the trajectory
    per_sample: bool = True
    history_dtype: torch.dtype | None = torch.float32  # the ring's dtype (None: the residual's own)
    times: list[float] = field(default_factory=list)
    ring: torch.Tensor | None = None  # (K, B, F), preallocated; slots not in ``slots`` hold stale values
    slots: list[int] = field(default_factory=list)  # the ring's slots in use, oldest first
    prediction: torch.Tensor | None = None  # the predicted residual's static buffer (shape and dtype of a residual)
    inputs: torch.Tensor | None = None  # Policy.input_gate: the stack inputs' ring, (K, B, F) like ``ring``
    gate: torch.Tensor | None = None  # Policy.input_gate: the gate terms' static buffer, (4, B, F) float32
    shape: tuple[int, ...] | None = None  # the residual's shape
    modulation: torch.Tensor | float = 1.0  # μ of Policy.modulate_denominator, one per batch element
    modulation_mean: float = 1.0  # its batch mean, for the stats (read once per fit, not once per predicted step)
    signature: Any = None  # the input signature its history was computed with
    check_errors: list[float] = field(default_factory=list)  # the newest checked errors (jump detection)
    steps: list[int] = field(default_factory=list)  # the history's step indices, as ``times``
    # Policy.gap_correction: Σ g_k R̂_k over the predicted steps since the newest computed one (float32, a residual's
    # shape) and their (time, g_k)
    gap_sum: torch.Tensor | None = None
    gap: list[tuple[float, float]] = field(default_factory=list)
    pending: torch.Tensor | None = None  # the last gap's integral error, for the next predicted step to cancel
    # Policy.gap_space="sample": Σ g_k v̂_k over the gap's predicted calls' sample outputs (float32), and each call's
    # leaves with their tensors' versions (to run it again once the gap ends; a version that moved was written to)
    gap_outputs: torch.Tensor | None = None
    gap_calls: list[tuple[list, list]] = field(default_factory=list)

    @property
    def has_history(self) -> bool:
        return bool(self.slots)

    @property
    def residuals(self) -> list[torch.Tensor]:
        """The history, oldest first, as views of the ring (no copies)."""
        return [self.ring[s].reshape(self.shape) for s in self.slots]

    @property
    def stacked(self) -> torch.Tensor | None:
        """The history as one (n, B, F) tensor, oldest first: a copy of the ring's slots in use (for readers
        outside the runtime; the runtime reads :attr:`ring` through :attr:`slots`)."""
        return self.ring[self.slots] if self.slots else None

    @property
    def newest(self) -> torch.Tensor:
        return self.ring[self.slots[-1]].reshape(self.shape)

    @property
    def stacked_inputs(self) -> torch.Tensor | None:
        """The stack inputs at the history's steps (``Policy.input_gate``), oldest first, as :attr:`stacked`."""
        return self.inputs[self.slots] if self.slots and self.inputs is not None else None

    def push(self, time: float, residual: torch.Tensor, keep: int, stack_input: torch.Tensor | None = None,
             step: int = -1) -> None:
        rows = residual.shape[0] if self.per_sample and residual.dim() > 0 else 1
        dtype = self.history_dtype or residual.dtype
        if (self.ring is None or tuple(residual.shape) != self.shape or self.ring.shape[0] != keep
                or self.ring.dtype != dtype or self.ring.device != residual.device or self.ring.shape[1] != rows
                or (stack_input is not None) != (self.inputs is not None)):
            self.ring = torch.zeros(keep, rows, residual.numel() // rows, dtype=dtype, device=residual.device)
            self.prediction = torch.empty_like(residual)
            self.inputs = torch.zeros_like(self.ring) if stack_input is not None else None
            self.gate = (torch.empty(4, rows, residual.numel() // rows, dtype=torch.float32, device=residual.device)
                         if stack_input is not None else None)
            self.slots = []
            self.times = []
            self.steps = []
        if len(self.slots) < keep:
            slot = next(k for k in range(keep) if k not in self.slots)
        else:
            slot = self.slots.pop(0)
        self.ring[slot].copy_(residual.reshape(rows, -1))
        if stack_input is not None:
            self.inputs[slot].copy_(stack_input.reshape(rows, -1))
        self.slots.append(slot)
        self.times = self.times[-(keep - 1):] + [time] if keep > 1 else [time]
        self.steps = self.steps[-(keep - 1):] + [step] if keep > 1 else [step]
        self.shape = tuple(residual.shape)
        self.gap = []
        self.gap_calls = []

    def add_to_gap(self, time: float, weight: float, residual: torch.Tensor | None) -> None:
        """Policy.gap_correction: a predicted step stepped with ``residual``, weighted ``weight`` in the gap's sum
        (``residual`` None: only the step's time and weight, its output follows in :meth:`add_output_to_gap`)."""
        if residual is not None:
            _weighted_accumulate(self, "gap_sum", residual, weight, first=not self.gap)
        self.gap.append((time, weight))

    def add_output_to_gap(self, weight: float, output: torch.Tensor, leaves: list) -> None:
        """Policy.gap_space="sample": a predicted call's sample output, weighted ``weight``, and its inputs."""
        _weighted_accumulate(self, "gap_outputs", output, weight, first=not self.gap_calls)
        self.gap_calls.append((list(leaves), [leaf._version if isinstance(leaf, torch.Tensor) else None
                                              for leaf in leaves]))

    def clear_history(self) -> None:
        """Forget the residuals (and the controller's error state); the step count, plan and buffers stay."""
        self.times = []
        self.steps = []
        self.slots = []
        self.gap = []
        self.gap_calls = []
        self.pending = None
        self.modulation, self.modulation_mean = 1.0, 1.0
        self.check_errors = []
        self.controller.clear_history()


def _weighted_accumulate(owner: Any, name: str, value: torch.Tensor, weight: float, *, first: bool) -> None:
    """``owner.name (+)= weight · value`` in a float32 buffer of ``value``'s shape, (re)allocated where it differs."""
    buffer = getattr(owner, name)
    if buffer is None or buffer.shape != value.shape or buffer.device != value.device:
        buffer = torch.empty(value.shape, dtype=torch.float32, device=value.device)
        setattr(owner, name, buffer)
        first = True
    if first:
        torch.mul(value.float(), weight, out=buffer)
    else:
        buffer.add_(value, alpha=weight)


@dataclass
class _TimeGrid:
    """One candidate time grid of the scheduler (one value per step) and its scale to the model's units, fixed by
    the first received time; dropped for the rest of the trajectory once a received time does not follow it."""

    values: list[float]
    scale: float | None = None
    valid: bool = True

    def time(self, step: int) -> float | None:
        """The step's time in the model's units (None before the scale is known, or where the grid gives 0)."""
        if not self.valid or self.scale is None or not 0 <= step < len(self.values) or self.values[step] == 0.0:
            return None
        return self.scale * self.values[step]

    def follows(self, step: int, received: float, tolerance: float) -> bool:
        """Whether ``received`` (the model's time at ``step``) follows the grid; the first nonzero pair fixes the
        scale. A grid that does not follow is dropped."""
        if not self.valid:
            return False
        if not 0 <= step < len(self.values):
            self.valid = False
        elif self.values[step] == 0.0 or received == 0.0:
            self.valid = self.values[step] == received
        elif self.scale is None:
            self.scale = received / self.values[step]
        else:
            time = self.scale * self.values[step]
            self.valid = abs(time - received) <= tolerance * abs(time)
        return self.valid


@dataclass
class _PendingTime:
    """A step stepped at its time from the scheduler's grid; the model's own ``received`` time (a device scalar) is
    checked against it at the next host read."""

    step: int
    time: float
    received: torch.Tensor
    dtype: torch.dtype


@dataclass
class _PendingFallback:
    """A predicted call whose residual may have had non-finite rows replaced (``rows``: how many, a device scalar),
    reported at the next host read."""

    step: int
    branch: int
    record: int  # its index in stats.records
    rows: torch.Tensor


def _size(num_bytes: int) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"


def read_scalars(tensors: Sequence[torch.Tensor]) -> list[float]:
    """The values of small tensors as Python floats, in ONE host read (concatenated on the device first)."""
    device = next((t.device for t in tensors if t.device.type != "cpu"), torch.device("cpu"))
    return torch.cat([t.detach().reshape(-1).to(device=device, dtype=torch.float64) for t in tensors]).tolist()


def _time_tolerance(dtype: torch.dtype) -> float:
    """How far (relative) a received time may be from its grid time: the received value and the scale each carry
    one rounding of ``dtype`` (float32 for full-precision and integer timesteps, whose grid values are float32)."""
    if dtype in (torch.float16, torch.bfloat16):
        return 4 * torch.finfo(dtype).eps
    return 16 * torch.finfo(torch.float32).eps


class TCPadeRuntime:
    """Drives one transformer with TC-Padé. Installed by :func:`tcpade_fx.compile`; see the module docstring."""

    def __init__(
        self,
        module: torch.nn.Module,
        policy: Policy,
        backend: str = "eager",
        *,
        verify: bool = True,
        block_prefixes: tuple[str, ...] | None = None,
        backend_options: dict | None = None,
        graph_source: Callable[[dict], GraphSet] | None = None,
        dynamic_shapes: bool = True,
        max_graph_sets: int = 4,
        process_group=None,
    ):
        """``graph_source``, when given, replaces capture + backend: it is called with the bound keyword
        arguments of each new input signature and returns the :class:`GraphSet` to step with (the exported
        runners of :mod:`tcpade_fx.export` plug onnxruntime sessions or TensorRT engines in this way).

        With ``dynamic_shapes`` the graphs are captured with symbolic batch and token axes where the model allows
        (:mod:`tcpade_fx.passes.dynamic`): a new resolution or batch size the graphs accept reuses them, checked
        once against the eager forward at its first call (two forwards, no capture). At most ``max_graph_sets``
        graph sets are held; the least recently used is dropped (with a note) when another is captured.

        Under context parallelism (diffusers' ``enable_parallelism``, found at each call, or ``process_group``)
        every statistic behind a decision or a prediction is reduced over the group (:mod:`tcpade_fx.distributed`),
        so that every process takes the same decisions; graphs are then captured with static shapes (each
        process's graph holds its own chunk and the collectives)."""
        if not isinstance(max_graph_sets, int) or max_graph_sets < 1:
            raise ValueError(f"max_graph_sets must be an int >= 1, got {max_graph_sets!r}")
        self.module = module
        self.policy = policy
        self.backend = get_backend(backend).require() if graph_source is None else None
        self.backend_options = dict(backend_options or {})
        self.verify = verify
        self.block_prefixes = block_prefixes
        self.graph_source = graph_source
        self.dynamic_shapes = dynamic_shapes and graph_source is None
        self.max_graph_sets = max_graph_sets
        self.process_group = process_group
        self._parallel: ParallelContext | None = None
        self._stats = TCPadeStats()
        self._graph_sets: OrderedDict[Any, GraphSet] = OrderedDict()  # least recently used first
        self._aliases: dict[Any, Any] = {}  # exact signature -> key of the graph set that runs it
        self._current_signature: Any = None
        self._num_steps: int | None = None
        self._euler_sigmas: list[float] | None = None  # Policy.gap_correction: σ_0..σ_N of a one-step Euler sampler
        self._driven = False
        self._time_grids: list[_TimeGrid] = []
        self._step_index: Callable[[], int | None] | None = None
        # exported graphs carry their own weights: a model change cannot be followed, only refused
        self._fingerprint: ModelFingerprint | None = model_fingerprint(module) if graph_source else None
        self._model_checked = False
        self.standing_notes: list[str] = []  # repeated in the stats of every trajectory (what the install left out)
        self.reset()

    # -- trajectory state ------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every history; the next call starts a new trajectory. What the device still holds for the notes
        of the trajectory that ends is read first (never dropped)."""
        if getattr(self, "_pending_times", None) or getattr(self, "_pending_fallbacks", None):
            self._flush_pending()
        self._branches: dict[Any, Branch] = {}
        self._step = -1
        self._last_time: float | None = None
        self._position = 0  # the call's position within its step
        self._step_pending = True
        # pipeline-driven times: each step's time comes from the scheduler's grid, the model's own value is read with
        # the next computed call's statistics (one host read per computed call, none per predicted call)
        self._received: dict[int, float] = {}  # the model's times read so far, by step
        self._pending_times: list[_PendingTime] = []  # steps stepped at grid times, not yet checked
        self._pending_fallbacks: list[_PendingFallback] = []  # predicted calls whose finiteness is not yet read
        self._read_times = False  # the model's times do not follow the grid: read at every call

    def begin(
        self,
        num_steps: int | None = None,
        *,
        schedule: Sequence[Sequence[float]] | None = None,
        step_index: Callable[[], int | None] | None = None,
        euler_sigmas: Sequence[float] | None = None,
        sampler: str | None = None,
    ) -> None:
        """Start a new trajectory of ``num_steps`` steps (pipelines call this); resets histories and stats.

        With ``schedule`` (what :func:`tcpade_fx.compile` passes for a pipeline) the steps are driven by the
        scheduler rather than read off the timestep's value: a call is a new step when it is the first one or
        :meth:`step_done` came since the previous one (otherwise it is the next guidance branch of the same step),
        its index is ``step_index()`` when that gives one (an img2img pipeline starts part-way into the
        schedule) and one more than the previous otherwise. ``schedule`` holds candidate time grids, one value
        per step (the scheduler's sigmas, its timesteps): when the model receives its timestep in float16 or
        bfloat16, whose rounding would distort the gaps between steps or even merge two steps, the time used is
        the first candidate that the received values follow up to that rounding, scaled to the model's units.

        ``euler_sigmas``: σ_0..σ_N of a sampler whose step is ``x + (σ_{k+1} − σ_k)·output`` (what
        ``Policy.gap_correction`` needs; :func:`tcpade_fx.integration.euler_sigmas`); ``sampler`` names the
        scheduler for the note where it has none.
        """
        self.reset()
        # notes taken since the last begin() with no call in between (a pipeline begins twice) carry over
        carried = [n for n in ([] if self._stats.records else self._stats.notes) if n not in self.standing_notes]
        self._stats = TCPadeStats(compiles=self._stats.compiles, notes=[*self.standing_notes, *carried])
        if self._parallel is not None and self._parallel_note(self._parallel) not in self._stats.notes:
            self._stats.notes.append(self._parallel_note(self._parallel))
        self.follow_model()
        self._num_steps = num_steps
        if num_steps is not None and num_steps < self.policy.min_steps:
            self._stats.notes.append(
                f"{num_steps} steps, fewer than Policy.min_steps={self.policy.min_steps}: every step computed (caching "
                "a few-step model costs quality for little gain; lower min_steps to cache anyway)")
        self._driven = schedule is not None
        self._time_grids = [_TimeGrid([float(v) for v in grid]) for grid in schedule or ()]
        self._step_index = step_index
        self._euler_sigmas = [float(v) for v in euler_sigmas] if euler_sigmas is not None else None
        if self.policy.gap_correction and self._gap_blocked_by_policy():
            self._note_once(f"Policy.gap_correction is not applied: {self._gap_blocked_by_policy()}")
        elif self.policy.gap_correction and self._driven and self._euler_sigmas is None:
            self._note_once(
                f"Policy.gap_correction is not applied: the scheduler ({sampler or 'unknown'}) is not a one-step Euler "
                "sampler (x + (σ_next − σ)·output, e.g. FlowMatchEulerDiscreteScheduler without stochastic sampling), "
                "so a gap's integral error cannot be cancelled on the computed step; the predictions are as without it")

    def follow_model(self) -> bool:
        """Compare the model with what the graphs were captured from (:mod:`tcpade_fx.model_state`); when it
        changed (a LoRA attached, scaled, fused or removed, a Parameter or submodule replaced) drop every graph set,
        so that the next call re-captures, with a note. Runs at the start of each trajectory (:meth:`begin`, and a
        bare transformer's new trajectory); returns whether the model changed.

        Raises:
            RuntimeError: the runtime runs exported graphs (their weights are in the files), and the model changed.
        """
        if self._fingerprint is None or self._model_checked:
            return False
        self._model_checked = True  # until the next call: a pipeline begins twice per call
        now = model_fingerprint(self.module)
        change = now.difference(self._fingerprint)
        if not change:
            return False
        if self.graph_source is not None:
            raise RuntimeError(
                f"the transformer changed since the exported graphs were installed ({change}); they hold the "
                "weights they were exported with. Export again (tcpade_fx.export.to_onnx/to_tensorrt) with the "
                "model as it is now, or tcpade_fx.compile(pipe) to follow model changes"
            )
        self._stats.notes.append(f"model changed since the graphs were captured ({change}): "
                                f"{len(self._graph_sets)} graph set(s) dropped, re-captured at the next call")
        self.clear_graphs()
        self._fingerprint = None
        return True

    def clear_graphs(self) -> None:
        """Drop every graph set (and every history): the next call captures again."""
        self._graph_sets.clear()
        self._aliases.clear()
        self._current_signature = None
        self.reset()

    def step_done(self) -> None:
        """The scheduler finished a step: the next call starts the next one (pipelines call this)."""
        self._step_pending = True

    # -- introspection ---------------------------------------------------------------------------------------
    @property
    def stats(self) -> TCPadeStats:
        """What the runtime did since the last trajectory began: records, notes, compile counts. Reading it first
        reads what is still pending on the device (whether the last predictions were finite, whether the model's
        own times of the last steps followed the scheduler's grid): at most one host read, outside the transformer
        calls, and only where something is pending."""
        self._flush_pending()
        return self._stats

    @property
    def current_stats(self) -> TCPadeStats:
        """The stats as they stand, without reading what is pending on the device (for hooks inside a call)."""
        return self._stats

    @property
    def graphs(self) -> GraphSet | None:
        """The graph set of the current input signature (None before the first call)."""
        return self._graph_sets.get(self._aliases.get(self._current_signature))

    @property
    def graph_sets(self) -> int:
        """How many input signatures have a graph set held."""
        return len(self._graph_sets)

    @property
    def branches(self) -> dict[Any, Branch]:
        """The current trajectory's branches, keyed by ``cache_context`` name or position within the step."""
        return dict(self._branches)

    # -- capture ---------------------------------------------------------------------------------------------
    @staticmethod
    def _signature_of(leaves: list, spec: pytree.TreeSpec) -> tuple:
        parts = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                parts.append(("T", tuple(leaf.shape), leaf.dtype, leaf.device.type, leaf.device.index))
            else:
                parts.append(("V", repr(leaf)))
        return (str(spec), tuple(parts))

    def _build(self, kwargs: dict, forward: Callable | None) -> GraphSet:
        if self.graph_source is not None:
            graph_set = self.graph_source(kwargs)
            if graph_set.input_gate != self.policy.input_gate:
                raise ValueError(
                    f"the policy has input_gate={self.policy.input_gate} but the given graphs were built "
                    + ("with" if graph_set.input_gate else "without")
                    + " the input gate's tensors: export the graphs with the policy that runs them")
            if graph_set.input_gate:
                self._note_input_gate(None)
            return graph_set
        modules = self.policy.granularity == "modules"
        gated = self.policy.input_gate
        graphs = build_graphs(self.module, kwargs, forward=forward, block_prefixes=self.block_prefixes,
                              verify=self.verify, granularity=self.policy.granularity,
                              dynamic=self.dynamic_shapes and self._parallel is None and not modules,
                              input_gate=gated, per_sample=self.policy.per_sample)
        if gated:
            self._note_input_gate(graphs.residual)
        if graphs.units is not None:  # standing: every trajectory's stats say what the history holds
            units, p = graphs.units, self.policy
            dtype = p.history_torch_dtype or torch.float32  # "model": the units' own dtype, float32
            batch = units.shapes[0][0]
            size = p.history_size * batch * units.width * dtype.itemsize
            note = (f"granularity 'modules': {len(units.outputs)} module outputs forecast "
                    f"({units.width} values per sample, {units.width / units.stream_width:.1f}x the stack residual; "
                    f"the history holds {_size(size)} per guidance branch at batch {batch}, {p.history_size} x "
                    f"{dtype_name(dtype)}"
                    + ("; history_dtype='bfloat16' halves it" if dtype.itemsize == 4 else "")
                    + "), graphs captured with static shapes")
            self.standing_notes = [n for n in self.standing_notes if not n.startswith("granularity 'modules'")]
            self.standing_notes.append(note)
            self._stats.notes.append(note)
        self._fingerprint = model_fingerprint(self.module)
        self._stats.captures += 1
        shape_notes = graphs.shapes.notes if graphs.shapes is not None else []  # which axes are dynamic: see .shapes
        self._stats.notes.extend(n for n in graphs.notes if n not in shape_notes)
        compile_graph, options = self.backend.compile_graph, self.backend_options
        return GraphSet(
            plan=graphs.plan,
            compute=compile_graph(graphs.compute, "compute", self._count_compile, **options),
            predict=compile_graph(graphs.predict, "predict", self._count_compile, **options),
            in_spec=graphs.in_spec,
            out_spec=graphs.out_spec,
            timestep_position=graphs.timestep_position,
            first_outputs=((*graphs.outputs, graphs.residual, *([graphs.stack_input] if gated else []))
                           if graphs.outputs is not None else None),
            shapes=graphs.shapes if graphs.shapes is not None and graphs.shapes.dims else None,
            example=[leaf_layout(x) for x in graphs.leaves],
            capture_route=graphs.capture_route,
            input_gate=gated,
        )

    def _note_input_gate(self, residual: torch.Tensor | None) -> None:
        """Standing note of ``Policy.input_gate``: every trajectory's stats say what the history holds."""
        p = self.policy
        size = (2 * p.history_size * residual.numel() * (p.history_torch_dtype or torch.float32).itemsize
                if residual is not None else None)
        note = ("input_gate: the history keeps the block stack's inputs beside its residuals (twice the memory"
                + (f": {_size(size)} per guidance branch at batch {residual.shape[0]})" if size else ")"))
        self.standing_notes = [n for n in self.standing_notes if not n.startswith("input_gate:")]
        self.standing_notes.append(note)
        self._stats.notes.append(note)

    def _graph_set_for(self, signature, leaves: list, kwargs: dict, forward: Callable | None) -> tuple[GraphSet, bool]:
        """The graph set that runs ``signature`` (most recently used now), and whether it was captured for it."""
        key = self._aliases.get(signature)
        if key is None and self._parallel is None:  # parallel graph sets are static (and per process)
            key = next((k for k, g in self._graph_sets.items() if g.accepts(leaves)), None)
            if key is not None and not self._verify_new_shape(self._graph_sets[key], signature, leaves, kwargs,
                                                               forward):
                key = None
        captured = key is None
        if captured:
            key = signature
            try:
                built, failure = self._build(kwargs, forward), None
            except Exception as exc:  # capture, locate and verification errors: agreed on below, then raised
                built, failure = None, exc
            self._agree_on_capture(failure)
            self._graph_sets[key] = built
            self._graph_sets[key].verified.add(signature)
            while len(self._graph_sets) > self.max_graph_sets:
                old, _ = self._graph_sets.popitem(last=False)
                self._aliases = {s: k for s, k in self._aliases.items() if k != old}
                self._stats.notes.append(f"graph set of an earlier input signature dropped (least recently used; "
                                        f"max_graph_sets={self.max_graph_sets})")
        self._aliases[signature] = key
        self._graph_sets.move_to_end(key)
        return self._graph_sets[key], captured

    def _agree_on_capture(self, failure: BaseException | None) -> None:
        """Under parallelism, every process learns whether the capture (and its verification) failed on any
        process before one of them runs a graph: all raise, or none. Raises ``failure`` where it is not None."""
        if self._parallel is not None:
            flag = torch.tensor([0.0 if failure is None else 1.0], dtype=torch.float64, device=self._device())
            rows = self._parallel.reducer.gather(flag)
            failed = [r for r in range(rows.shape[0]) if float(rows[r, 0]) > 0]
            if failure is None and failed:
                raise DivergedDecisionError(
                    f"capturing the transformer failed on process(es) {failed} of the {self._parallel.description} "
                    f"group (this is process {self._parallel.rank}): every process stops here rather than run graphs "
                    "the others do not. The cause is in the output of the failing process(es).")
        if failure is not None:
            raise failure

    def _device(self) -> torch.device:
        """Where the reducer's statistics live (NCCL gathers CUDA tensors): the model's device."""
        param = next(self.module.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @property
    def _reducer(self) -> StatReducer:
        return self._parallel.reducer if self._parallel is not None else LOCAL

    def _follow_parallel(self) -> ParallelContext | None:
        """The parallel setup of this call (diffusers' ``enable_parallelism`` may come before or after compile);
        a change is noted (the input signature carries it, so graphs are captured for the new setup)."""
        parallel = parallel_context(self.module, self.process_group)
        if parallel is not None and self.graph_source is not None:
            raise UnsupportedParallelismError(
                f"{type(self.module).__name__} runs exported graphs (export.load(...).install) and has context "
                "parallelism enabled: the exported graphs hold the whole sequence and no collectives, so they cannot "
                "run one process's chunk. Run exported graphs one request per process (data parallelism), or use "
                "tcpade_fx.compile(pipe) with context parallelism.")
        if parallel is not None and self.policy.input_gate:
            raise UnsupportedParallelismError(
                f"{type(self.module).__name__} has context parallelism enabled and the policy has input_gate=True: "
                "the gate's fit would see one process's chunk of the tokens only (each would predict differently). "
                "Use policy.replace(input_gate=False) with context parallelism.")
        key = parallel.key if parallel is not None else None
        if key != (self._parallel.key if self._parallel is not None else None):
            self._stats.notes.append(self._parallel_note(parallel))
        self._parallel = parallel
        return parallel

    @staticmethod
    def _parallel_note(parallel: ParallelContext | None) -> str:
        if parallel is None:
            return "parallelism off: statistics are this process's own"
        return (f"{parallel.description}, process {parallel.rank} of {parallel.world_size}: every statistic behind a "
                "decision or a prediction is reduced over the group and each decision checked equal on every "
                "process; graphs captured with static shapes (each process's holds its own chunk)")

    def _verify_new_shape(self, graphs: GraphSet, signature, leaves: list, kwargs: dict, forward) -> bool:
        """Check dynamic-shape graphs at a size they were not captured at (one eager forward, one compute graph;
        its outputs serve the call). False, with a note, where they do not reproduce it: capture for it instead."""
        if signature in graphs.verified or not self.verify:
            return True
        try:
            reference = eager_outputs(self.module, kwargs, forward)
            with torch.no_grad():
                checked = check_rewrite(reference, graphs.compute, graphs.predict, leaves, graphs.plan, exact=False,
                                        input_gate=self.policy.input_gate)
        except VerificationError as exc:
            self._stats.notes.append(f"the dynamic-shape graphs do not reproduce a new input shape ({exc}): "
                                    "captured for it instead")
            return False
        if checked.compute_difference:
            self._stats.notes.append(f"dynamic-shape graphs at a new input shape differ from the eager forward by "
                                    f"{checked.compute_difference:.1e} (relative), within the verification tolerance")
        graphs.verified.add(signature)
        graphs.first_outputs = (*checked.outputs, checked.residual,
                                *([checked.stack_input] if self.policy.input_gate else []))
        return True

    def _count_compile(self, name: str) -> None:
        self._stats.compiles[name] = self._stats.compiles.get(name, 0) + 1

    # -- the call --------------------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.call(args, kwargs)

    def call(self, args: tuple, kwargs: dict, *, forward: Callable | None = None, context: str | None = None):
        """One transformer call. ``forward`` is what a capture traces (the forward below the runtime's hook, so
        that other libraries' hooks are captured as they run); ``context`` the pipeline's ``cache_context``
        name, which keys the branch's history."""
        kwargs = bind_call(self.module, args, kwargs)
        self._model_checked = False
        parallel = self._follow_parallel()
        timestep = kwargs.get(time_argument(kwargs) or "timestep")
        bare_time = None  # a bare transformer's time: its one read per call
        if not self._driven and isinstance(timestep, torch.Tensor):
            bare_time = float(timestep.reshape(-1)[0])
            if self._last_time is not None and bare_time > self._last_time:
                self.follow_model()  # a bare transformer's new trajectory: where begin() would have checked
        current = self.graphs
        leaves, spec = flatten_call((), kwargs, current.in_spec if current else None)
        signature = self._signature_of(leaves, spec)
        if parallel is not None:
            signature = (*signature, parallel.key)
        graphs, captured = self._graph_set_for(signature, leaves, kwargs, forward)
        self._current_signature = signature
        timestep = leaves[graphs.timestep_position]
        if self._driven:
            branch = self._advance(None, context)
            time, deferred = self._driven_time(timestep, branch)
        else:
            time, deferred = float(timestep.reshape(-1)[0]) if bare_time is None else bare_time, None
            branch = self._advance(time, context)
        if branch.signature != signature:
            # a history is only valid for the signature it was computed with; the trajectory (step count, stage,
            # budget) goes on. Per branch: true CFG whose two prompts differ in length keeps both histories.
            where = f"call {len(self._stats.records)} (step {self._step}, branch {branch.index})"
            if branch.signature is not None:
                self._stats.notes.append(f"input signature changed at {where}: graphs "
                                        f"{'re-captured' if captured else 'reused'}, its history reset")
                branch.clear_history()
            elif captured and len(self._graph_sets) > 1:
                self._stats.notes.append(f"new input signature at {where}: graphs re-captured "
                                        f"({len(self._graph_sets)} signatures kept)")
            branch.signature = signature
        hidden = kwargs.get("hidden_states")
        batch = int(hidden.shape[0]) if isinstance(hidden, torch.Tensor) and hidden.dim() > 0 else 1
        with torch.no_grad():
            flat = self._run(graphs, branch, leaves, time, context, batch, deferred)
        return pytree.tree_unflatten(list(flat), graphs.out_spec)

    def _advance(self, time: float | None, context: str | None) -> Branch:
        if self._driven:
            if self._step_pending:
                index = self._step_index() if self._step_index is not None else None
                self._step = index if index is not None and index > self._step else self._step + 1
                self._position = 0
                self._step_pending = False
            else:
                self._position += 1
        elif self._last_time is not None and time == self._last_time:
            self._position += 1
        else:
            if self._last_time is not None and time > self._last_time:
                self._stats.notes.append(
                    f"timestep went up ({self._last_time:g} -> {time:g}) at call {len(self._stats.records)}: "
                    "treated as a new trajectory, histories reset"
                )
                self.reset()
                self._num_steps = None  # begin() was not called for this trajectory: an earlier num_steps is stale
            self._step += 1
            self._position = 0
            self._last_time = time
        key = context if context is not None else self._position
        if key not in self._branches:
            self._branches[key] = Branch(StepController(self.policy, self._num_steps, self._step_lengths()),
                                         index=len(self._branches),
                                         per_sample=self.policy.per_sample,
                                         history_dtype=self.policy.history_torch_dtype)
        return self._branches[key]

    def _step_lengths(self) -> list[float] | None:
        """The first time grid's step lengths (a flow scheduler's sigmas), for the budget plan
        (Policy.step_size_weight); None without a grid (a bare transformer)."""
        first = self._time_grids[0].values if self._time_grids else []
        return [abs(a - b) for a, b in zip(first, first[1:])] or None

    def _driven_time(self, timestep: torch.Tensor, branch: Branch) -> tuple[float | None, torch.Tensor | None]:
        """The time of a pipeline-driven call, without a host read where possible: ``(time, None)``, or ``(None,
        received)`` where the step is decided without its time (no history: it computes) and the model's time is
        read with the call's statistics (:meth:`_run`).

        The time is the scheduler's grid value at the step, scaled to the model's units (the scale fixed by the
        first received time); the model's own value is kept on the device and checked at the next host read. Where
        no grid is known to hold (no scale yet, a zero grid value, a grid the model's times do not follow, or grids
        that disagree: a DPM solver's sigmas and timesteps, told apart by the second step's time) the received time
        is read (one host read)."""
        step, dtype = self._step, timestep.dtype
        if step in self._received:  # read already for this step (an earlier branch): no read
            return self._resolved_time(step, self._received[step], dtype), None
        grid_time = None if self._read_times else self._grid_time(step, dtype)
        received = timestep.detach().reshape(-1)[:1].to(torch.float64, copy=True)
        if grid_time is not None:
            if all(p.step != step for p in self._pending_times):
                self._pending_times.append(_PendingTime(step, grid_time, received, dtype))
            return grid_time, None
        if not self._read_times and self._time_grids and branch.controller.decides_without_time:
            return None, received
        self._received[step] = float(received)  # a host read: no grid time to step with
        return self._resolved_time(step, self._received[step], dtype), None

    def _grid_time(self, step: int, dtype: torch.dtype) -> float | None:
        """The step's time on the grids still in play, where they agree (grids not proportional to each other, e.g.
        a DPM solver's sigmas and timesteps, agree only once a received time has dropped the others); None where
        they do not, or where no grid has a scale yet."""
        times = [t for t in (g.time(step) for g in self._time_grids) if t is not None]
        if not times or any(abs(t - times[0]) > _time_tolerance(dtype) * abs(times[0]) for t in times[1:]):
            return None
        if len(times) < sum(g.valid for g in self._time_grids):  # a grid still in play has no scale yet
            return None
        return times[0]

    def _resolved_time(self, step: int, received: float, dtype: torch.dtype) -> float:
        """The step's time from the model's ``received`` one: the first grid it follows (at the grid's exact
        value, free of the model's rounding), else ``received`` itself, with a note (once): the times are then
        read at every call."""
        tolerance = _time_tolerance(dtype)
        following = [grid for grid in self._time_grids if grid.follows(step, received, tolerance)]  # all checked
        if following:
            time = following[0].time(step)
            return received if time is None else time
        if not self._read_times:
            self._read_times = True
            if dtype in (torch.float16, torch.bfloat16):
                self._stats.notes.append(
                    f"step {step}: the {dtype} timestep {received:g} does not follow the scheduler's time grid; "
                    "extrapolating on the rounded model times (pass the timestep in float32 for exact gaps)")
            elif self._time_grids:
                self._stats.notes.append(
                    f"step {step}: the model's timestep {received:g} does not follow the scheduler's time grid "
                    "(neither its sigmas nor its timesteps, scaled): read from the model's input at every call from "
                    "here (one host read per call)")
        return received

    def _check_pending_times(self, times: list[_PendingTime], values: list[float]) -> int | None:
        """Check the steps stepped at grid times against the model's own (now read) times. Returns the first step
        whose time did not follow (with a note, histories restarted, times read at every call from here), else
        None."""
        for pending, received in zip(times, values):
            self._received[pending.step] = received
            time = self._resolved_time(pending.step, received, pending.dtype)
            if abs(time - pending.time) > _time_tolerance(pending.dtype) * abs(pending.time):
                self._stats.notes.append(
                    f"step {pending.step}: the model's timestep {received:g} is not the scheduler's grid time "
                    f"{pending.time:g} it was stepped at (and steps after it up to this check, step {self._step}); "
                    "every history restarted, the times read at every call from here")
                for branch in self._branches.values():
                    branch.clear_history()
                return pending.step
        return None

    def _flush_pending(self) -> None:
        """Read what the device still holds for the notes (one host read, where anything is pending)."""
        times, fallbacks = self._pending_times, self._pending_fallbacks
        if not times and not fallbacks:
            return
        self._pending_times, self._pending_fallbacks = [], []
        self._settle_pending(fallbacks, times, read_scalars([*(f.rows for f in fallbacks), *(p.received for p in times)]))

    def _settle_pending(self, fallbacks: list[_PendingFallback], times: list[_PendingTime],
                        values: list[float]) -> int | None:
        """Note the fallbacks and check the times from their read ``values`` (fallbacks' rows first, then the
        times); returns what :meth:`_check_pending_times` returns."""
        self._note_fallbacks(fallbacks, values[:len(fallbacks)])
        return self._check_pending_times(times, values[len(fallbacks):])

    @property
    def _process_share(self) -> str:
        return "" if self._parallel is None else f", in process {self._parallel.rank}'s share of the tokens"

    def _note_fallbacks(self, fallbacks: list[_PendingFallback], rows: list[float]) -> None:
        for pending, replaced in zip(fallbacks, rows):
            if replaced:
                self._stats.notes.append(
                    f"step {pending.step}: predicted residual not finite in {replaced:g} batch row(s) (branch "
                    f"{pending.branch}{self._process_share}): the newest computed residual used there instead")
                record = self._stats.records[pending.record]
                record.reason += "; not finite: the newest computed residual used"

    def _run(self, graphs: GraphSet, branch: Branch, leaves: list, time: float | None, context: str | None,
             batch: int = 1, deferred: torch.Tensor | None = None) -> tuple:
        """Decide, then predict or compute. A predicted call reads nothing to the host; a computed call reads once
        (:func:`read_scalars`): its residual's finiteness, the check's error and velocity, the modulation's mean,
        and what earlier calls left pending (their predictions' finiteness, the model's times). ``time`` is None,
        with the model's time in ``deferred``, where the step is decided before its time is known."""
        p = self.policy
        step = self._step
        decision = branch.controller.decide(step, time)
        first, graphs.first_outputs = graphs.first_outputs, None  # serves only the call that was captured
        record = dict(step=step, branch=branch.index, context=context, time=time, decision=decision)
        # the controller's effective order: on two history points Padé [0/1], not the Taylor-1 that
        # extrapolate(order=1) would substitute; measured on mnist-dit, 20 steps, "balanced" (48 seeds, the first
        # prediction has two points): 37.1 dB with [0/1], 32.4 dB with Taylor-1
        order = max(decision.order, 0)
        fit = self._agree_on_decision(branch, decision, time, order, batch)
        if not decision.compute:
            residual = extrapolate_stacked(
                branch.times, branch.ring, time, like=branch.newest, method=p.method,
                order=order, eps=p.eps, pole_margin=p.pole_margin,
                damping=decision.damping, modulation=branch.modulation, fit=fit,
                slots=branch.slots, out=branch.prediction,
            )
            # never stepped with a non-finite residual, without a read: such rows become the newest computed
            # residual's (always finite), reported at the next read
            rows = replace_nonfinite_(residual, branch.newest, per_sample=p.per_sample)
            self._pending_fallbacks.append(_PendingFallback(step, branch.index, len(self._stats.records), rows))
            in_sample = p.gap_space == "sample"
            weight = None
            if p.gap_correction:
                weight = self._add_to_gap(branch, step, time, None if in_sample else residual)
                length = self._gap_step(step) if branch.pending is not None else None  # pending: gap_space="residual"
                if length:
                    residual.sub_(branch.pending.reshape(residual.shape), alpha=1.0 / length)
                    branch.pending = None
            if p.input_gate:
                gate = input_gate_terms(branch.times, branch.ring, branch.inputs, time, prior=residual,
                                        slots=branch.slots, out=branch.gate)
                out = graphs.predict(*leaves, residual, gate.view(4, *residual.shape))
            else:
                out = graphs.predict(*leaves, residual)
            if in_sample and weight is not None:
                self._add_output_to_gap(branch, weight, out, leaves)
            branch.controller.record_predict()
            self._record(**record, modulation=branch.modulation_mean if self._modulates else None)
            return out
        *out, residual = first if first is not None else graphs.compute(*leaves)
        stack_input = None
        if p.input_gate:
            *out, residual, stack_input = (*out, residual)
        # collective 2 of a computed step: the residual's finiteness (as the history stores it) and the a-posteriori
        # check's statistics; then the call's one host read, with what earlier calls left pending (this process's
        # own: which rows of its share of a prediction were replaced, the model's times)
        pack = StatPack()
        stored = residual if branch.history_dtype in (None, residual.dtype) else residual.to(branch.history_dtype)
        finite = nonfinite_partial(stored)
        if stack_input is not None:
            finite = finite + nonfinite_partial(stack_input)
        finite_at = pack.add("sum", finite)
        check = (self._check_partials(branch, residual, time, order, fit, pack, stack_input)
                 if branch.has_history else None)
        fallbacks, self._pending_fallbacks = self._pending_fallbacks, []
        times, self._pending_times = self._pending_times, []
        reduced = pack.reduce(self._reducer)
        scalars = [reduced[finite_at]]
        if check is not None:
            scalars += self._check_scalars(check, reduced)
        checked = len(scalars)
        scalars += [f.rows for f in fallbacks] + [t.received for t in times]
        if deferred is not None:
            scalars.append(deferred)
        values = read_scalars(scalars)  # the call's one host read
        nonfinite, check_values, values = values[0], values[1:checked], values[checked:]
        if deferred is not None:
            self._received[step] = values.pop()
            time = record["time"] = self._resolved_time(step, self._received[step], deferred.dtype)
        restarted = self._settle_pending(fallbacks, times, values)
        if restarted is not None:  # the grid time this call was stepped at was not the model's: its check too
            check = None
            time = record["time"] = self._received.get(step, time)
        if nonfinite:
            self._stats.notes.append(f"step {step}: block-stack residual"
                                     + (" or input" if stack_input is not None else "") + " not finite, history cleared")
            branch.clear_history()
            self._record(**record, computed=True)
            return out
        check_error = velocity = None
        if check is not None:
            check_error, velocity = self._finish_check(branch, time, check, check_values)
        if check_error is not None and self._is_jump(branch, check_error):
            self._stats.notes.append(
                f"step {step} (branch {branch.index}): the checked error {check_error:.3g} is "
                f"{check_error / statistics.median(branch.check_errors):.0f}x its recent level: what conditions the "
                "blocks changed regime, history restarted from this step")
            branch.clear_history()
            check_error = velocity = None
        if check_error is not None:
            branch.check_errors = branch.check_errors[-4:] + [check_error]
        branch.controller.record_compute(step, time, check_error, velocity)
        miss = self._gap_miss(branch, graphs, step, time, residual) if restarted is None else None
        if miss is not None and p.gap_space == "sample":
            # the gap's error in the sample, taken off by this step (a step x + h·output moves it by −miss)
            sample = out[0]
            out[0] = sample.float().sub_(miss.reshape(sample.shape), alpha=1.0 / self._gap_step(step)).to(sample.dtype)
        elif miss is not None:
            branch.pending = miss if branch.pending is None else branch.pending.add_(miss)
        if branch.pending is not None and self._is_last_step(step):
            # the trajectory's last step: no later step to carry what is pending (this gap's, or one carried past
            # computed steps since), so this one steps with it (one more tail)
            corrected = torch.sub(residual.float(), branch.pending.reshape(residual.shape),
                                  alpha=1.0 / self._gap_step(step))
            out = graphs.predict(*leaves, branch.prediction.copy_(corrected))
            branch.pending = None
        branch.push(time, residual, p.history_size, stack_input, step=step)
        self._record(**record, check_error=check_error, computed=True, gap_corrected=miss is not None)
        return out

    def _agree_on_decision(self, branch: Branch, decision, time: float, order: int, batch: int):
        """Collective 1 of a step: the decision, checked equal on every process, and the history's denominator fit
        (the same fit serves the prediction and the a-posteriori check). Returns the global fit statistics (None
        where the extrapolant fits no denominator). One process: no communication, the statistics are its own.

        The pack has the same length on every process whatever their state (the fit's block is sized by the call's
        batch and zero where unused), so that diverged processes meet in this one collective and raise
        :class:`DivergedDecisionError` instead of entering different graphs' collectives."""
        p = self.policy
        fit = (denominator_partials(branch.times, branch.ring, time, method=p.method, order=order,
                                    slots=branch.slots)
               if branch.has_history else None)
        if self._parallel is None:
            return fit
        device = branch.ring.device if branch.has_history else self._device()
        rows = p.per_sample and batch or 1
        if fit is not None:
            rows = max(rows, fit[0].shape[0])
        block = torch.zeros(rows, 3, dtype=torch.float32, device=device)
        count = 0
        if fit is not None:
            block[: fit[0].shape[0]] = fit[0]
            count = fit[1]
        seen = [self._step, branch.index, int(decision.compute), decision.order, len(branch.times),
                -1 if fit is None else fit[0].shape[0]]
        guard = torch.tensor(seen, dtype=torch.float64, device=device)
        pack = StatPack()
        low, high = pack.add("min", guard), pack.add("max", guard)
        scaled, summed = pack.add("scaled", block), pack.add("sum", torch.tensor([float(count)], device=device))
        reduced = pack.reduce(self._reducer)
        if not torch.equal(reduced[low], reduced[high]):
            names = ("step", "branch", "compute", "order", "history", "fit rows")
            lo, hi = reduced[low].tolist(), reduced[high].tolist()
            differ = ", ".join(f"{n} {a:g}..{b:g}" for n, a, b in zip(names, lo, hi) if a != b)
            raise DivergedDecisionError(
                f"the {self._parallel.description} processes reached different decisions at call "
                f"{len(self._stats.records)} (this is process {self._parallel.rank}, which has "
                f"{dict(zip(names, seen))}, error estimate {decision.error_estimate}, tolerance "
                f"{decision.tolerance}; across the group: {differ}). They would enter different graphs' "
                "collectives and deadlock, so every process stops here. Every process must run the same "
                "pipeline call (same steps, guidance, inputs); report this if they do.")
        if fit is None:
            return None
        return reduced[scaled][: fit[0].shape[0]], reduced[summed][0]

    def _is_jump(self, branch: Branch, check_error: float) -> bool:
        p = self.policy
        if len(branch.check_errors) < 3 or not check_error > p.jump_floor:
            return False
        return check_error > p.jump_factor * statistics.median(branch.check_errors)

    @property
    def _modulates(self) -> bool:
        return self.policy.method == "pade" and self.policy.modulate_denominator

    def _check_partials(self, branch: Branch, residual: torch.Tensor, time: float, order: int, fit,
                        pack: StatPack, stack_input: torch.Tensor | None = None) -> dict:
        """What the branch would have predicted at this computed step, as this process's shares of the statistics
        the check needs, added to ``pack``: the prediction's relative error, the residual's velocity and, with
        ``modulate_denominator``, the fit of the modulation μ to this residual for the predictions that follow.
        With ``input_gate`` the prediction checked is the gated one (given this step's ``stack_input``); μ is fitted
        to the prior, which is what it modulates."""
        p = self.policy
        kw = dict(like=branch.newest, order=order, eps=p.eps, pole_margin=p.pole_margin, fit=fit, slots=branch.slots)
        found = {}
        if not self._modulates:
            predicted = extrapolate_stacked(branch.times, branch.ring, time, method=p.method, **kw)
        else:
            pade = extrapolate_stacked(branch.times, branch.ring, time, method="pade", **kw)
            taylor = extrapolate_stacked(branch.times, branch.ring, time, method="taylor", **kw)
            # on the residual's device: a CPU μ of shape (1, 1, ...) would not broadcast against CUDA tensors
            mu = (branch.modulation.to(device=residual.device, dtype=torch.float32)
                  if isinstance(branch.modulation, torch.Tensor)
                  else torch.full((1,), float(branch.modulation), device=residual.device))
            # the prediction extrapolate_stacked(modulation=μ) makes, from P and T (which the fit needs anyway)
            predicted = (taylor + mu.reshape(-1, *[1] * (taylor.dim() - 1)) * (pade - taylor)).to(taylor.dtype)
            partials, count = modulation_partials(residual, pade, taylor, per_sample=p.per_sample)
            found["mu"], found["count"] = mu, count
            found["modulation"] = pack.add("scaled", partials), pack.add(
                "sum", torch.full((1,), float(count), device=residual.device))
        if stack_input is not None:
            terms = input_gate_terms(branch.times, branch.ring, branch.inputs, time, prior=predicted,
                                     slots=branch.slots)
            predicted = input_gated_residual(predicted, terms, stack_input, per_sample=p.per_sample).to(predicted.dtype)
        found["error"] = pack.add("norm", relative_error_partials(residual, predicted, per_sample=p.per_sample))
        found["velocity"] = pack.add("norm", relative_error_partials(residual, branch.newest, per_sample=False))
        return found

    def _check_scalars(self, check: dict, reduced: list) -> list[torch.Tensor]:
        """The check's results as device scalars for the call's read: the checked error and the velocity (both the
        batch maximum), and with the modulation fit the batch mean of the modulation it would set (kept in
        ``check["fitted"]`` until the read says the step is finite)."""
        scalars = [relative_error_from(reduced[check["error"]]).max(), relative_error_from(reduced[check["velocity"]]).max()]
        if "modulation" in check:
            at, count_at = check["modulation"]
            mu = check["mu"]
            count = reduced[count_at][0] if self._parallel is not None else check["count"]
            fitted = modulation_from(reduced[at], count, default=mu)
            a = self.policy.modulation_smoothing
            check["fitted"] = a * fitted + (1 - a) * mu
            scalars.append(check["fitted"].mean())
        return scalars

    def _finish_check(self, branch: Branch, time: float, check: dict, values: list[float]) -> tuple:
        """The checked error and velocity from the read values; updates the branch's modulation."""
        check_error, velocity = values[0], None
        dt = abs(time - branch.times[-1])
        if dt > 0:
            velocity = values[1] / dt
        if "fitted" in check:
            branch.modulation, branch.modulation_mean = check["fitted"], values[2]
        return check_error, velocity

    def _record(self, step, branch, context, time, decision, check_error=None, computed=False, modulation=None,
                gap_corrected=False):
        self._stats.records.append(StepRecord(
            step=step, branch=branch, time=time, computed=computed, stage=decision.stage, reason=decision.reason,
            order=decision.order, damping=decision.damping, modulation=modulation,
            error_estimate=decision.error_estimate, check_error=check_error, context=context,
            gap_corrected=gap_corrected,
        ))

    # -- Policy.gap_correction -------------------------------------------------------------------------------
    def _gap_blocked_by_policy(self) -> str | None:
        """Why the policy's other fields keep Policy.gap_correction from applying (None: they do not)."""
        p = self.policy
        if p.granularity != "stack":
            return (f"granularity={p.granularity!r} forecasts module outputs, not the block stack's residual it "
                    "corrects (set gap_correction=0 to silence this)")
        if p.input_gate:
            return ("input_gate=True moves each prediction inside the predict graph, where the gap's sum cannot see "
                    "what the step stepped with (set one of them off)")
        return None

    def _gap_weight(self, step: int) -> float | None:
        """A step's weight in a gap's sum, ``(σ_{k+1} − σ_k) / σ_k``: its step length times the share of an error
        made at σ_k still in the sample at the computed step (σ_c / σ_k, the σ_c applied there); None where the
        sampler's noise levels are not known for the step."""
        length = self._gap_step(step)
        return None if length is None or not self._euler_sigmas[step] > 0 else length / self._euler_sigmas[step]

    def _note_once(self, note: str) -> None:
        if note not in self._stats.notes:
            self._stats.notes.append(note)

    def _add_to_gap(self, branch: Branch, step: int, time: float, residual: torch.Tensor | None) -> float | None:
        """A predicted step's share of its gap (``residual`` None under gap_space="sample": the output follows);
        returns its weight, None where the gap cannot be corrected."""
        blocked = self._gap_blocked_by_policy()
        if blocked:
            self._note_once(f"Policy.gap_correction is not applied: {blocked}")
            return None
        weight = self._gap_weight(step)
        if weight is not None:
            branch.add_to_gap(time, weight, residual)
        elif self._euler_sigmas is not None:
            branch.gap.append((time, math.nan))  # a step outside the sampler's noise levels: this gap stays as it is
        elif not self._driven:
            self._note_once("Policy.gap_correction is not applied: a bare transformer call has no sampler whose "
                            "steps it could correct (call it through a diffusers pipeline, or set gap_correction=0)")
        return weight

    def _add_output_to_gap(self, branch: Branch, weight: float, out, leaves: list) -> None:
        sample = out[0] if len(out) else None
        if isinstance(sample, torch.Tensor) and sample.is_floating_point():
            branch.add_output_to_gap(weight, sample, leaves)
            return
        time, _ = branch.gap[-1]
        branch.gap[-1] = (time, math.nan)  # no sample to correct: this gap stays as it is
        self._note_once("Policy.gap_correction is not applied: the transformer's first output is not a floating "
                        "tensor (the sample gap_space='sample' corrects); set gap_space='residual'")

    def _is_last_step(self, step: int) -> bool:
        """Whether ``step`` is the trajectory's last (False where the number of steps is unknown)."""
        return self._num_steps is not None and step >= self._num_steps - 1

    def _gap_step(self, step: int) -> float | None:
        """The sampler's step length σ_{k+1} − σ_k at ``step`` (None where unknown)."""
        sig = self._euler_sigmas
        if sig is None or not 0 <= step < len(sig) - 1:
            return None
        return sig[step + 1] - sig[step]

    def _gap_miss(self, branch: Branch, graphs: GraphSet, step: int, time: float,
                  residual: torch.Tensor) -> torch.Tensor | None:
        """Under Policy.gap_correction, at a computed step that ends a gap: the integral error the gap's steps put
        into the sample. gap_space="residual": ``κ·σ_c·(Σ_k g_k R̂_k − Σ_j W_j R_j)`` (float32, a residual's shape;
        W_j interpolate the newest computed residuals and this one, :func:`~tcpade_fx.pade.gap_integral_weights`),
        for a later step of length h to step with ``R − miss / h``. gap_space="sample": ``κ·σ_c·Σ_k g_k (v̂_k −
        ṽ_k)`` in the sample output's shape, ṽ_k the gap's k-th call run again with the interpolant at its time,
        for this step (length h) to step with ``output − miss / h``. None where there is nothing to correct, the
        sampler's noise levels are unknown, the interpolant's older nodes lie in the early stage, the gap is longer
        than ``Policy.gap_span_limit`` allows, or (sample) an input of the gap's calls was written to since."""
        p = self.policy
        gap, branch.gap = branch.gap, []
        calls, branch.gap_calls = branch.gap_calls, []
        older = GAP_NODES - 1
        sig = self._euler_sigmas
        if (not gap or not p.gap_correction or self._gap_weight(step) is None or len(branch.times) < older
                or not all(math.isfinite(g) for _, g in gap)):
            return None
        n = self._num_steps
        if n is not None and n > 1 and min(branch.steps[-older:]) / (n - 1) < p.early_end:
            return None
        if not 0 <= branch.steps[-1] < len(sig):
            return None
        span = sig[branch.steps[-1]] - sig[step]
        # the last step is exempt: no computed step follows for the gap's drift to feed into
        if not self._is_last_step(step) and span * span > p.gap_span_limit * sig[step]:
            return None
        node_times = [*branch.times[-older:], time]
        nodes = [branch.ring[slot] for slot in branch.slots[-older:]] + [residual]
        scale = p.gap_correction * sig[step]
        if p.gap_space == "sample":
            return self._gap_sample_miss(branch, graphs, gap, calls, node_times, nodes, scale)
        weights = gap_integral_weights(node_times, [t for t, _ in gap], [g for _, g in gap])
        return gap_miss(branch.gap_sum, nodes, weights, scale)

    def _gap_sample_miss(self, branch: Branch, graphs: GraphSet, gap: list, calls: list, node_times: list,
                         nodes: list, scale: float) -> torch.Tensor | None:
        """gap_space="sample": each of the gap's calls run again through the predict graph with the interpolant of
        ``nodes`` at its time; ``scale · Σ_k g_k (v̂_k − ṽ_k)``."""
        if len(calls) != len(gap):
            return None
        for leaves, versions in calls:
            if any(isinstance(leaf, torch.Tensor) and leaf._version != version
                   for leaf, version in zip(leaves, versions)):
                self._note_once("Policy.gap_correction skipped a gap: an input of one of its transformer calls was "
                                "modified in place before the gap ended (gap_space='sample' runs those calls again); "
                                "pass fresh tensors per step, or set gap_space='residual'")
                return None
        rerun = None
        for (t, g), (leaves, _) in zip(gap, calls):
            interpolated = weighted_sum(nodes, gap_integral_weights(node_times, [t], [1.0]))
            sample = graphs.predict(*leaves, branch.prediction.copy_(interpolated.reshape(branch.prediction.shape)))[0]
            rerun = sample.float().mul(g) if rerun is None else rerun.add_(sample, alpha=g)
        return branch.gap_outputs.sub(rerun).mul_(scale)
