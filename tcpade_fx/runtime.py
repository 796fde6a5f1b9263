"""The stateful part of tcpade_fx: per-signature graphs, per-branch history and controllers, and the stats.

A :class:`TCPadeRuntime` replaces a transformer's ``forward``. On the first call with a new input signature
(tensor shapes, dtypes, devices and the non-tensor arguments) it captures the transformer, locates and verifies
the block stack, builds the compute/predict graphs and hands them to the backend. Each call then:

1. finds the step and the guidance branch (one history per branch). In a pipeline the scheduler drives this
   (:meth:`TCPadeRuntime.begin` with its schedule): a call after the scheduler's ``step`` is the next step, at the
   scheduler's own step index (img2img starts part-way), further calls before it are further branches, and the
   time is the scheduler's exact grid where the model receives a float16/bfloat16 timestep. A bare transformer
   is read off the ``timestep`` argument: calls at the same time as the previous call are further branches, a
   new time is the next step, a time above the previous one starts a new trajectory (noted in the stats). An
   input signature that changes resets only that branch's history; the trajectory goes on;
2. asks the branch's :class:`~tcpade_fx.controller.StepController` to compute or predict;
3. computes (and checks what it would have predicted, feeding the a-posteriori error back; with
   ``Policy.modulate_denominator`` it also refits the modulation μ between Padé and its b = 0 polynomial,
   :func:`~tcpade_fx.pade.fit_modulation`) or predicts the residual with
   :func:`~tcpade_fx.pade.extrapolate_stacked` and runs the predict graph.

The compute/predict decision stays in Python, outside every graph, so each graph compiles once.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch.utils import _pytree as pytree

from .controller import StepController
from .pade import all_finite, extrapolate_stacked, fit_modulation, relative_error, stack_history
from .passes import BlockStackPlan, capture_graph, flatten_call, locate_block_stack, rewrite_and_verify
from .policy import Policy

BACKENDS = ("eager", "inductor", "tensorrt")


@dataclass
class StepRecord:
    """One transformer call: which step and branch, what was decided and how well it went."""

    step: int
    branch: int
    time: float
    computed: bool
    stage: str
    reason: str
    order: int
    damping: float
    modulation: float | None  # predicted steps with Policy.modulate_denominator: the μ used (batch mean)
    error_estimate: float | None
    check_error: float | None  # computed steps: relative error the prediction would have had here


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

    def decisions(self, branch: int = 0) -> str:
        """The branch's schedule as a string: ``C`` computed, ``.`` predicted."""
        return "".join("C" if r.computed else "." for r in self.records if r.branch == branch)

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
class _Graphs:
    plan: BlockStackPlan
    compute: Callable
    predict: Callable
    out_spec: pytree.TreeSpec
    in_spec: pytree.TreeSpec
    timestep_position: int


@dataclass
class _Branch:
    controller: StepController
    times: list[float] = field(default_factory=list)
    residuals: list[torch.Tensor] = field(default_factory=list)
    stacked: torch.Tensor | None = None  # the residuals as stack_history() gives them, rebuilt on each push
    modulation: torch.Tensor | float = 1.0  # μ of Policy.modulate_denominator, one per batch element
    modulation_mean: float = 1.0  # its batch mean, for the stats (read once per fit, not once per predicted step)
    key: Any = None  # the input signature its history was computed with

    def clear_history(self) -> None:
        """Forget the residuals (and the controller's error state); the step count and plan stay."""
        self.times.clear()
        self.residuals.clear()
        self.stacked = None
        self.modulation, self.modulation_mean = 1.0, 1.0
        self.controller.clear_history()


@dataclass
class _TimeGrid:
    """One candidate time grid of the scheduler (one value per step) and its scale to the model's units, fixed by
    the first call; dropped for the rest of the trajectory once a received time does not follow it."""

    values: list[float]
    scale: float | None = None
    valid: bool = True

    def time(self, step: int, received: float, tolerance: float) -> float | None:
        if not self.valid or not 0 <= step < len(self.values) or self.values[step] == 0.0:
            return None
        if self.scale is None:
            if received == 0.0:
                return None
            self.scale = received / self.values[step]
        time = self.scale * self.values[step]
        if abs(time - received) <= tolerance * abs(time):
            return time
        self.valid = False
        return None


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
        graph_source: Callable[[dict], "_Graphs"] | None = None,
    ):
        """``graph_source``, when given, replaces capture + backend: it is called with the bound keyword
        arguments of each new input signature and returns the graphs to step with (the exported runners of
        :mod:`tcpade_fx.export` plug onnxruntime sessions or TensorRT engines in this way)."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        self.module = module
        self.policy = policy
        self.backend = backend
        self.verify = verify
        self.block_prefixes = block_prefixes
        self.graph_source = graph_source
        self.signature = inspect.signature(type(module).forward)
        self.stats = TCPadeStats()
        self._graphs: dict[Any, _Graphs] = {}
        self._current_key: Any = None
        self._num_steps: int | None = None
        self._announced = False
        self._driven = False
        self._time_grids: list[_TimeGrid] = []
        self._step_index: Callable[[], int | None] | None = None
        self.reset()

    # -- trajectory state ------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every history; the next call starts a new trajectory."""
        self._branches: dict[int, _Branch] = {}
        self._step = -1
        self._last_time: float | None = None
        self._branch = 0
        self._step_pending = True

    def begin(
        self,
        num_steps: int | None = None,
        *,
        schedule: Sequence[Sequence[float]] | None = None,
        step_index: Callable[[], int | None] | None = None,
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
        """
        self.reset()
        self.stats = TCPadeStats(compiles=self.stats.compiles)
        self._num_steps = num_steps
        self._announced = True
        self._driven = schedule is not None
        self._time_grids = [_TimeGrid([float(v) for v in grid]) for grid in schedule or ()]
        self._step_index = step_index

    def step_done(self) -> None:
        """The scheduler finished a step: the next call starts the next one (pipelines call this)."""
        self._step_pending = True

    # -- capture ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _original_forward(self):
        installed = self.module.__dict__.pop("forward", None)
        try:
            yield
        finally:
            if installed is not None:
                self.module.forward = installed

    def _bind(self, args: tuple, kwargs: dict) -> dict:
        bound = self.signature.bind(self.module, *args, **kwargs)
        named = dict(bound.arguments)
        named.pop(next(iter(self.signature.parameters)))  # self
        for name, p in self.signature.parameters.items():
            if p.kind is inspect.Parameter.VAR_KEYWORD and name in named:
                named.update(named.pop(name))
        return named

    @staticmethod
    def _key(leaves: list, spec: pytree.TreeSpec) -> tuple:
        parts = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                parts.append(("T", tuple(leaf.shape), leaf.dtype, leaf.device.type, leaf.device.index))
            else:
                parts.append(("V", repr(leaf)))
        return (str(spec), tuple(parts))

    def _build(self, kwargs: dict) -> _Graphs:
        if self.graph_source is not None:
            return self.graph_source(kwargs)
        if "timestep" not in kwargs or not isinstance(kwargs["timestep"], torch.Tensor):
            raise TypeError(
                f"{type(self.module).__name__} was called without a tensor `timestep`; tcpade_fx identifies steps "
                "by the model time, so pass timestep=<tensor>"
            )
        with self._original_forward():
            captured = capture_graph(self.module, (), kwargs)
        gm = captured.graph_module
        plan = locate_block_stack(gm, self.block_prefixes)
        compute, predict = rewrite_and_verify(gm, plan, captured.example_leaves, self.verify)
        self.stats.captures += 1
        return _Graphs(
            plan=plan,
            compute=self._backend_compile(compute, "compute"),
            predict=self._backend_compile(predict, "predict"),
            out_spec=captured.out_spec,
            in_spec=captured.in_spec,
            timestep_position=_leaf_index_of(kwargs, "timestep", captured.in_spec),
        )

    def _backend_compile(self, gm: torch.fx.GraphModule, name: str) -> Callable:
        if self.backend == "eager":
            return gm
        if self.backend == "tensorrt":
            from .export.tensorrt import compile_graph_tensorrt

            return compile_graph_tensorrt(gm, name, self.stats)
        from torch._inductor.compile_fx import compile_fx

        stats = self.stats

        def counting_inductor(graph: torch.fx.GraphModule, example_inputs):
            stats.compiles[name] = stats.compiles.get(name, 0) + 1
            return compile_fx(graph, example_inputs)

        return torch.compile(gm, backend=counting_inductor, fullgraph=True, dynamic=False)

    # -- the call --------------------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        kwargs = self._bind(args, kwargs)
        graphs_now = self._graphs.get(self._current_key)
        leaves, spec = flatten_call((), kwargs, graphs_now.in_spec if graphs_now else None)
        key = self._key(leaves, spec)
        captured = False
        if key not in self._graphs:
            self._graphs[key] = self._build(kwargs)
            captured = True
        self._current_key = key
        graphs = self._graphs[key]
        timestep = leaves[graphs.timestep_position]
        time = float(timestep.reshape(-1)[0])
        branch = self._advance(time)
        if self._driven and timestep.dtype in (torch.float16, torch.bfloat16):
            time = self._scheduled_time(time, timestep.dtype)
        if branch.key != key:
            # a history is only valid for the signature it was computed with; the trajectory (step count, stage,
            # budget) goes on. Per branch: true CFG whose two prompts differ in length keeps both histories.
            if branch.key is not None:
                self.stats.notes.append(
                    f"input signature changed at call {len(self.stats.records)} (step {self._step}, branch "
                    f"{self._branch}): graphs {'re-captured' if captured else 'reused'}, its history reset"
                )
                branch.clear_history()
            elif captured and len(self._graphs) > 1:
                self.stats.notes.append(
                    f"new input signature at call {len(self.stats.records)} (step {self._step}, branch "
                    f"{self._branch}): graphs re-captured ({len(self._graphs)} signatures kept)"
                )
            branch.key = key
        with torch.no_grad():
            flat = self._run(graphs, branch, leaves, time)
        return pytree.tree_unflatten(list(flat), graphs.out_spec)

    def _advance(self, time: float) -> _Branch:
        if self._driven:
            if self._step_pending:
                index = self._step_index() if self._step_index is not None else None
                self._step = index if index is not None and index > self._step else self._step + 1
                self._branch = 0
                self._step_pending = False
            else:
                self._branch += 1
        elif self._last_time is not None and time == self._last_time:
            self._branch += 1
        else:
            if self._last_time is not None and time > self._last_time:
                self.stats.notes.append(
                    f"timestep went up ({self._last_time:g} -> {time:g}) at call {len(self.stats.records)}: "
                    "treated as a new trajectory, histories reset"
                )
                self.reset()
                # begin() clears _last_time, so this trajectory was not announced: an earlier num_steps is stale
                self._num_steps = None
                self._announced = False
            self._step += 1
            self._branch = 0
            self._last_time = time
        if self._branch not in self._branches:
            self._branches[self._branch] = _Branch(StepController(self.policy, self._num_steps))
        return self._branches[self._branch]

    def _scheduled_time(self, received: float, dtype: torch.dtype) -> float:
        """The step's time from the scheduler's grid, in the model's units, where the rounded ``received`` value
        follows it; ``received`` itself (with a note, once) where no grid does."""
        tolerance = 4 * torch.finfo(dtype).eps  # the received value and the scale each carry one rounding
        for grid in self._time_grids:
            time = grid.time(self._step, received, tolerance)
            if time is not None:
                return time
        if not any("does not follow" in n for n in self.stats.notes):
            self.stats.notes.append(
                f"step {self._step}: the {dtype} timestep {received:g} does not follow the scheduler's time grid; "
                "extrapolating on the rounded model times (pass the timestep in float32 for exact gaps)"
            )
        return received

    def _run(self, graphs: _Graphs, branch: _Branch, leaves: list, time: float) -> tuple:
        p = self.policy
        step = self._step
        decision = branch.controller.decide(step, time)
        check_error = None
        # the controller's effective order: on two history points Padé [0/1], not the Taylor-1 that
        # extrapolate(order=1) would substitute; measured on mnist-dit, 20 steps, "balanced" (48 seeds, the first
        # prediction has two points): 37.1 dB with [0/1], 32.4 dB with Taylor-1
        if not decision.compute:
            residual = extrapolate_stacked(
                branch.times, branch.stacked, time, like=branch.residuals[-1], method=p.method,
                order=max(decision.order, 0), eps=p.eps, pole_margin=p.pole_margin,
                damping=decision.damping, modulation=branch.modulation,
            )
            if all_finite(residual):
                out = graphs.predict(*leaves, residual)
                branch.controller.record_predict()
                mu = branch.modulation_mean if self._modulates else None
                self._record(step, time, decision, None, modulation=mu)
                return out
            self.stats.notes.append(f"step {step}: predicted residual not finite, computed instead")
        *out, residual = graphs.compute(*leaves)
        if not all_finite(residual):
            self.stats.notes.append(f"step {step}: block-stack residual not finite, history cleared")
            branch.clear_history()
            self._record(step, time, decision, None, computed=True)
            return out
        velocity = None
        if branch.residuals:
            predicted = self._check_and_modulate(branch, residual, time, max(decision.order, 0))
            check_error = float(relative_error(residual, predicted, per_sample=p.per_sample).max())
            last, dt = branch.residuals[-1], abs(time - branch.times[-1])
            if dt > 0:
                velocity = float(relative_error(residual, last, per_sample=False).max()) / dt
        branch.controller.record_compute(step, time, check_error, velocity)
        branch.times.append(time)
        branch.residuals.append(residual)
        del branch.times[: -p.history_size], branch.residuals[: -p.history_size]
        branch.stacked = stack_history(branch.residuals, p.per_sample)
        self._record(step, time, decision, check_error, computed=True)
        return out

    @property
    def _modulates(self) -> bool:
        return self.policy.method == "pade" and self.policy.modulate_denominator

    def _check_and_modulate(self, branch: _Branch, residual: torch.Tensor, time: float, order: int) -> torch.Tensor:
        """What the branch would have predicted at this computed step; with ``modulate_denominator``, also fit the
        modulation μ to this residual for the predictions that follow."""
        p = self.policy
        kw = dict(like=branch.residuals[-1], order=order, eps=p.eps, pole_margin=p.pole_margin)
        if not self._modulates:
            return extrapolate_stacked(branch.times, branch.stacked, time, method=p.method, **kw)
        pade = extrapolate_stacked(branch.times, branch.stacked, time, method="pade", **kw)
        taylor = extrapolate_stacked(branch.times, branch.stacked, time, method="taylor", **kw)
        # on the residual's device: a CPU μ of shape (1, 1, ...) would not broadcast against CUDA tensors
        mu = torch.as_tensor(branch.modulation, dtype=torch.float32, device=residual.device)
        # the prediction extrapolate_stacked(modulation=μ) makes, from P and T (which the fit needs anyway)
        predicted = (taylor + mu.reshape(-1, *[1] * (taylor.dim() - 1)) * (pade - taylor)).to(taylor.dtype)
        fitted = fit_modulation(residual, pade, taylor, per_sample=p.per_sample, default=mu)
        a = p.modulation_smoothing
        branch.modulation = a * fitted + (1 - a) * mu
        branch.modulation_mean = float(branch.modulation.mean())
        return predicted

    def _record(self, step, time, decision, check_error, computed: bool = False, modulation=None) -> None:
        self.stats.records.append(
            StepRecord(
                step=step, branch=self._branch, time=time, computed=computed, stage=decision.stage,
                reason=decision.reason, order=decision.order, damping=decision.damping, modulation=modulation,
                error_estimate=decision.error_estimate, check_error=check_error,
            )
        )

    # -- introspection ---------------------------------------------------------------------------------------
    @property
    def graphs(self) -> _Graphs | None:
        """The graphs of the current input signature (None before the first call)."""
        return self._graphs.get(self._current_key)


def _leaf_index_of(kwargs: dict, name: str, in_spec: pytree.TreeSpec) -> int:
    marked = {k: (_Marker() if k == name else v) for k, v in kwargs.items()}
    leaves, _ = flatten_call((), marked, in_spec)
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, _Marker):
            return i
    raise KeyError(name)


class _Marker:
    pass
