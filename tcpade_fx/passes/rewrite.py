"""Rewrite a captured graph into the two branch-free graphs the runtime switches between.

``compute(*leaves) -> (*outputs, residual)`` runs everything and also returns ``R = h_out − h_in`` (float32).
``predict(*leaves, residual) -> (*outputs)`` runs the head, replaces the block stack by ``h_in + residual`` and
runs the tail; the body's ops are removed, and so is every head op only the body needed.

With ``input_gate`` (``Policy.input_gate``) the compute graph also returns the block stack's input ``h_in``
(float32, after the residual) and the predict graph takes the gate's terms after the residual, stepping with
``h_in + input_gated_residual(residual, gate, h_in)`` (:func:`tcpade_fx.pade.input_gated_residual`).
"""

from __future__ import annotations

import torch

from ..pade import input_gated_residual
from .locate import BlockStackPlan

aten = torch.ops.aten
RESIDUAL_INPUT = "tcpade_residual"
GATE_INPUT = "tcpade_input_gate"


def _copy(gm: torch.fx.GraphModule) -> tuple[torch.fx.Graph, dict, object]:
    graph = torch.fx.Graph()
    graph._codegen = torch.fx.graph.CodeGen()
    val_map: dict = {}
    out = graph.graph_copy(gm.graph, val_map)
    return graph, val_map, out


def _by_name(gm: torch.fx.GraphModule, name: str) -> torch.fx.Node:
    for node in gm.graph.nodes:
        if node.name == name:
            return node
    raise KeyError(f"node {name!r} not in graph")


def _dtype(node: torch.fx.Node) -> torch.dtype | None:
    val = node.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) else None


def _flat_outputs(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def build_compute_graph(gm: torch.fx.GraphModule, plan: BlockStackPlan, *, stack_input: bool = False
                        ) -> torch.fx.GraphModule:
    """The original computation plus the block-stack residual (float32, contiguous) as an extra last output; with
    ``stack_input`` also the block stack's input (float32, contiguous) after it."""
    graph, val_map, out = _copy(gm)
    h_in = val_map[_by_name(gm, plan.body_input)]
    h_out = val_map[_by_name(gm, plan.body_output)]
    with graph.inserting_before(h_out.next):
        a = graph.call_function(aten.to.dtype, (h_out, torch.float32))
        b = graph.call_function(aten.to.dtype, (h_in, torch.float32))
        r = graph.call_function(aten.sub.Tensor, (a, b))
        r = graph.call_function(aten.clone.default, (r,), {"memory_format": torch.contiguous_format})
        extra = (graph.call_function(aten.clone.default, (b,), {"memory_format": torch.contiguous_format}),
                 ) if stack_input else ()
    graph.output((*_flat_outputs(out), r, *extra))
    graph.lint()
    return torch.fx.GraphModule(gm, graph, class_name="TCPadeCompute")


def build_predict_graph(gm: torch.fx.GraphModule, plan: BlockStackPlan, *, input_gate: bool = False,
                        per_sample: bool = True) -> torch.fx.GraphModule:
    """The original computation with the block stack replaced by ``h_in + residual`` (residual: a new last input).

    With ``input_gate`` a second new input, the gate's terms ``(4, *residual.shape)`` float32, follows the residual
    and the stack steps with ``h_in + input_gated_residual(residual, gate, h_in, per_sample=per_sample)``."""
    graph, val_map, out = _copy(gm)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_before(placeholders[-1].next):
        residual = graph.placeholder(RESIDUAL_INPUT)
        gate = graph.placeholder(GATE_INPUT) if input_gate else None
    h_in = val_map[_by_name(gm, plan.body_input)]
    h_out_old = _by_name(gm, plan.body_output)
    h_out = val_map[h_out_old]
    dtype = _dtype(h_out_old) or torch.float32
    order = {n: i for i, n in enumerate(graph.nodes)}
    last_input = gate if gate is not None else residual
    anchor = h_in if order[h_in] > order[last_input] else last_input  # h_in may itself be an input placeholder
    with graph.inserting_before(anchor.next):
        x = graph.call_function(aten.to.dtype, (h_in, torch.float32))
        step = residual
        if gate is not None:
            step = graph.call_function(input_gated_residual, (residual, gate, x), {"per_sample": per_sample})
        x = graph.call_function(aten.add.Tensor, (x, step))
        x = graph.call_function(aten.to.dtype, (x, dtype))
        pred = graph.call_function(aten.clone.default, (x,), {"memory_format": torch.contiguous_format})
    h_out.replace_all_uses_with(pred)
    # the output value was copied before the output node exists: a body output returned as is needs mapping too
    out = torch.fx.node.map_arg(out, lambda n: pred if n is h_out else n)
    graph.output(tuple(_flat_outputs(out)))
    body = {val_map[_by_name(gm, name)] for name in plan.body_nodes}
    for node in reversed(list(graph.nodes)):
        if node in body:
            if node.users:
                raise RuntimeError(f"body node {node.name} is still used by {list(node.users)} after the rewrite")
            graph.erase_node(node)
    out_gm = torch.fx.GraphModule(gm, graph, class_name="TCPadePredict")
    out_gm.graph.eliminate_dead_code()
    out_gm.graph.lint()
    out_gm.delete_all_unused_submodules()
    out_gm.recompile()
    return out_gm
