"""The one driver of the graph passes: capture → locate → rewrite → verify, for the runtime and the exporters.

    graphs = build_graphs(transformer, kwargs)                  # static shapes (the runtime)
    graphs = build_graphs(transformer, kwargs, dynamic=True)    # symbolic batch/token axes (the exporters)
    graphs = build_graphs(transformer, kwargs, granularity="modules")  # forecast module outputs (.units)

Work on real tensors: one run of the transformer's own forward (the reference) and one of the compute graph,
whose outputs are returned in :attr:`Graphs.outputs` so that the call that was captured need not run again, plus
the predict graph (head and tail only) given the true residual.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from .capture import TIME_ARGUMENTS, capture_graph, flatten_call, leaf_index, leaf_names, time_argument
from .dynamic import ShapePlan, capture_dynamic
from .locate import BlockStackPlan, locate_block_stack
from .rewrite import build_compute_graph, build_predict_graph
from .units import GRANULARITIES, UnitPlan, build_units_compute_graph, build_units_predict_graph, locate_forecast_units
from .verify import VerificationError, check_rewrite, eager_outputs


@dataclass
class Graphs:
    """The two graphs the runtime switches between, and what was learnt capturing them.

    ``compute(*leaves) -> (*outputs, residual)`` and ``predict(*leaves, residual) -> outputs`` take the flattened
    call leaves (:func:`~tcpade_fx.passes.capture.flatten_call` with ``in_spec``); ``outputs`` unflatten with
    ``out_spec``. With ``granularity="modules"`` the residual is the forecast module outputs (``units``,
    :mod:`tcpade_fx.passes.units`) rather than the block stack's.
    """

    plan: BlockStackPlan
    compute: torch.fx.GraphModule
    predict: torch.fx.GraphModule
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    leaves: list[Any]  # the example leaves (the first call's, cloned)
    timestep_position: int
    outputs: list[Any] | None  # the compute graph's outputs on ``leaves`` (None when not verified)
    residual: torch.Tensor | None
    shapes: ShapePlan | None = None  # the dynamic axes (``dynamic=True``)
    capture_route: str = "torch.export"  # or "real-tensor trace" when torch.export refused the forward
    notes: list[str] = field(default_factory=list)  # the capture's and the verification's, for the stats
    verification: dict = field(default_factory=dict)
    units: UnitPlan | None = None  # granularity="modules": what the residual holds
    input_gate: bool = False  # Policy.input_gate graphs: compute also returns the stack input, predict takes the gate
    stack_input: torch.Tensor | None = None  # input_gate: the verified compute graph's stack input

    @property
    def leaf_names(self) -> list[str]:
        return leaf_names(self.in_spec, skip_first_key=True)

    @property
    def output_names(self) -> list[str]:
        return leaf_names(self.out_spec)

    @property
    def tensor_positions(self) -> list[int]:
        return [i for i, x in enumerate(self.leaves) if isinstance(x, torch.Tensor)]

    @property
    def tensor_names(self) -> list[str]:
        names = self.leaf_names
        return [names[i] for i in self.tensor_positions]


def _distinct_tensors(kwargs: dict) -> dict:
    # torch.export silently aliases inputs given as the same tensor object
    return pytree.tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, kwargs)


def build_graphs(
    module: torch.nn.Module,
    kwargs: dict,
    *,
    forward: Callable | None = None,
    dynamic: bool = False,
    dynamic_batch: bool = True,
    dynamic_tokens: bool = True,
    block_prefixes: tuple[str, ...] | None = None,
    verify: bool = True,
    granularity: str = "stack",
    input_gate: bool = False,
    per_sample: bool = True,
) -> Graphs:
    """Capture ``module(**kwargs)`` (through ``forward``, default the class's own), locate its block stack,
    build the compute and predict graphs and, with ``verify``, check them against one run of ``forward``.

    With ``dynamic`` the batch and token axes the model leaves free stay symbolic
    (:mod:`tcpade_fx.passes.dynamic`; ``dynamic_batch``/``dynamic_tokens`` select which).

    ``granularity``: ``"stack"`` (the residual is the block stack's) or ``"modules"`` (the outputs of every
    block's attention and feed-forward modules, :mod:`tcpade_fx.passes.units`; static shapes only, so
    ``dynamic`` must be False).

    ``input_gate`` (``Policy.input_gate``, stack granularity only): the compute graph also returns the block
    stack's input and the predict graph takes the gate's terms (:mod:`tcpade_fx.passes.rewrite`), with one gate
    per batch element where ``per_sample``.

    Raises:
        TypeError: the call has no tensor ``timestep`` (steps are identified by the model time).
        CaptureError, UnsupportedModelError, VerificationError: from the passes, each saying what to do.
    """
    time_name = time_argument(kwargs)
    if time_name is None:
        given = {k: type(v).__name__ for k, v in kwargs.items() if k in TIME_ARGUMENTS}
        raise TypeError(
            f"{type(module).__name__} was called without its model time as a tensor (looked for keyword "
            f"{' or '.join(TIME_ARGUMENTS)}; got {given or 'neither'}); tcpade_fx identifies steps by the model "
            "time, so pass it as a tensor (e.g. timestep=torch.tensor([t]))"
        )
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is not one of {GRANULARITIES}")
    if input_gate and granularity != "stack":
        raise ValueError("input_gate=True needs granularity='stack' (the gate fits the block stack's input)")
    if granularity == "modules" and dynamic:
        raise ValueError("granularity='modules' needs static shapes (dynamic=False): the forecast module outputs "
                         "are laid out with constant sizes; use granularity='stack' for dynamic-shape graphs")
    kwargs = _distinct_tensors(kwargs)
    shapes = None
    if dynamic:
        captured, plan, shapes = capture_dynamic(
            module, kwargs, dynamic_batch=dynamic_batch, dynamic_tokens=dynamic_tokens,
            block_prefixes=block_prefixes, forward=forward)
    else:
        captured = capture_graph(module, (), kwargs, forward=forward)
        plan = locate_block_stack(captured.graph_module, block_prefixes)
    gm, leaves = captured.graph_module, captured.example_leaves
    units = locate_forecast_units(gm, plan) if granularity == "modules" else None
    if units is None:
        compute = build_compute_graph(gm, plan, stack_input=input_gate)
        predict = build_predict_graph(gm, plan, input_gate=input_gate, per_sample=per_sample)
    else:
        compute, predict = build_units_compute_graph(gm, units), build_units_predict_graph(gm, units)
    graphs = Graphs(
        plan=plan, compute=compute, predict=predict, in_spec=captured.in_spec, out_spec=captured.out_spec,
        leaves=list(leaves), timestep_position=leaf_index(kwargs, time_name, captured.in_spec),
        outputs=None, residual=None, shapes=shapes, capture_route=captured.route,
        notes=[*captured.notes, *(shapes.notes if shapes else [])], units=units, input_gate=input_gate,
    )
    if verify:
        _, call_kwargs = pytree.tree_unflatten(list(leaves), captured.in_spec)
        reference = eager_outputs(module, call_kwargs, forward)
        checked = check_rewrite(reference, compute, predict, leaves, plan, exact=False, input_gate=input_gate)
        if checked.compute_difference:
            graphs.notes.append(
                f"the captured graph differs from the eager forward by {checked.compute_difference:.1e} (relative; "
                "torch.export's numerics), within the verification tolerance"
            )
        graphs.outputs, graphs.residual, graphs.stack_input = checked.outputs, checked.residual, checked.stack_input
        graphs.verification = {"compute": checked.compute_difference,
                               "predict_true_residual": checked.predict_difference}
    return graphs


def example_residual(graphs: Graphs) -> torch.Tensor:
    """The block-stack residual on the example leaves (the verified one, else one run of the compute graph)."""
    if graphs.residual is None:
        with torch.no_grad():
            graphs.residual = graphs.compute(*graphs.leaves)[-2 if graphs.input_gate else -1]
    return graphs.residual


__all__ = ["GRANULARITIES", "Graphs", "VerificationError", "build_graphs", "example_residual", "flatten_call"]
