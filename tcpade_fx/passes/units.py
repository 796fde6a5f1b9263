"""Module granularity: forecast the outputs of every block's token-mixing modules instead of the stack's residual.

    units = locate_forecast_units(gm, plan)                 # which module outputs a predicted step forecasts
    compute = build_units_compute_graph(gm, units)          # (*leaves) -> (*outputs, units (B, N) float32)
    predict = build_units_predict_graph(gm, units)          # (*leaves, units) -> outputs

A *forecast module* is a direct child of a block (``transformer_blocks.3.attn1``, ``blocks.0.ffn``) that runs a
matrix product on the hidden stream (it depends on the body's residual input): attention and feed-forward
modules. Norms, adaLN modulations (their linears read the time embedding, not the stream), gates and residual adds
are not: on a predicted step they still run, fed the forecast module outputs, so every block's time-conditioned
path is exact (diffusers' TaylorSeer units; bench/GRANULARITY_STUDY.md). A forecast module's output is forecast
only if something that still runs on a predicted step reads it: a Flux single block's ``attn`` and ``proj_mlp``
only feed its ``proj_out``, which is itself forecast, so they drop out (TaylorSeer's "skip" units, found here
from the graph rather than from a list of names).

The unit values travel as one float32 tensor ``(B, N)``: every forecast output flattened per batch row and
concatenated in graph order, so the runtime's history, extrapolants and per-sample statistics treat it as they
treat a stack residual. Static shapes only (the sizes of the pieces are constants of the graph).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from .locate import (BlockStackPlan, UnsupportedModelError, _block_pattern, _depends_on, _shape, _stack_paths,
                     _target_name)
from .rewrite import _copy, _flat_outputs

aten = torch.ops.aten
UNITS_INPUT = "tcpade_units"
#: What a predicted step forecasts: the block stack's residual, or every block's attention / feed-forward outputs.
GRANULARITIES: tuple[str, ...] = ("stack", "modules")

#: Ops that make a module a forecast module when they read the hidden stream.
_PRODUCTS = {
    "mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "convolution", "conv2d", "conv3d",
    "scaled_dot_product_attention", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention",
}


@dataclass(frozen=True)
class UnitPlan:
    """The forecast module outputs of a captured graph.

    ``outputs`` are node names in graph order, ``shapes``/``dtypes`` their values', ``modules`` the module paths
    they come out of (one per output), ``removed`` every node of the forecast modules (gone on predicted steps),
    ``stream_width`` the stack residual's elements per batch row (what ``granularity="stack"`` would keep).
    """

    stack: BlockStackPlan
    outputs: tuple[str, ...]
    modules: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    removed: frozenset[str]
    stream_width: int  # elements per batch row of the block stack's residual, for comparison

    @property
    def sizes(self) -> tuple[int, ...]:
        """Elements per batch row of each output."""
        return tuple(int(torch.Size(s[1:]).numel()) for s in self.shapes)

    @property
    def width(self) -> int:
        """Elements per batch row of the concatenated units."""
        return sum(self.sizes)


def _child_module(node: torch.fx.Node, pattern) -> str | None:
    """The path of the block child the node runs in (``transformer_blocks.0.attn1``), or None."""
    for path in _stack_paths(node):
        parent, _, child = path.rpartition(".")
        if parent and not child.isdigit() and pattern.match(parent):
            return path
    return None


def _static_shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    shape = _shape(node)
    return shape if shape is not None and all(isinstance(s, int) for s in shape) else None


def locate_forecast_units(gm: torch.fx.GraphModule, plan: BlockStackPlan) -> UnitPlan:
    """The outputs of the block children that run a matrix product on the hidden stream and that an op still
    running on a predicted step reads (see the module docstring).

    Raises:
        UnsupportedModelError: no such module, a graph with symbolic sizes, or a forecast output that is not a
            floating tensor with the batch as its first axis; the message says to use ``granularity="stack"``.
    """
    pattern = _block_pattern(plan.prefixes)
    nodes = list(gm.graph.nodes)
    by_name = {n.name: n for n in nodes}
    h_in = by_name[plan.body_input]
    module_of: dict[torch.fx.Node, str] = {}
    for node in nodes:
        if node.name not in plan.body_nodes:
            continue
        if node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node) and node.args[0] in module_of:
            module_of[node] = module_of[node.args[0]]  # a getitem goes with the op whose result it unpacks
            continue
        path = _child_module(node, pattern)
        if path is not None:
            module_of[node] = path
    streamed = _depends_on(nodes, h_in)
    forecast = {m for n, m in module_of.items() if n in streamed and _target_name(n) in _PRODUCTS}
    removed = {n for n, m in module_of.items() if m in forecast}
    if not removed:
        raise UnsupportedModelError(
            f"module granularity: no block child of {list(plan.prefixes)} runs a matrix product on the hidden "
            "stream, so there is no module output to forecast; use granularity='stack'"
        )
    # liveness from the outputs, stopping at forecast modules: what a predicted step still reads from them
    wanted: set[torch.fx.Node] = set()
    seen: set[torch.fx.Node] = set()
    todo = [n for n in nodes if n.op == "output"]
    while todo:
        node = todo.pop()
        for a in node.all_input_nodes:
            if a in seen:
                continue
            seen.add(a)
            if a in removed:
                wanted.add(a)
            else:
                todo.append(a)
    outputs = [n for n in nodes if n in wanted]
    batch = _static_shape(h_in)
    if batch is None:
        raise UnsupportedModelError(
            "module granularity needs graphs captured with static shapes (the unit sizes are constants of the "
            "graph); the runtime captures them so, an export cannot: use granularity='stack' to export"
        )
    shapes = [_static_shape(node) for node in outputs]
    for node, shape in zip(outputs, shapes):
        val = node.meta.get("val")
        if shape is None or not shape or shape[0] != batch[0] or not val.is_floating_point():
            raise UnsupportedModelError(
                f"module granularity: the output {node.name} of {module_of[node]} is "
                f"{getattr(val, 'shape', type(val).__name__)}, not a floating tensor with the batch "
                f"({batch[0]}) first, so it cannot be forecast per sample; use granularity='stack'"
            )
    return UnitPlan(
        stack=plan,
        outputs=tuple(n.name for n in outputs),
        modules=tuple(module_of[n] for n in outputs),
        shapes=tuple(shapes),
        dtypes=tuple(n.meta["val"].dtype for n in outputs),
        removed=frozenset(n.name for n in removed),
        stream_width=int(torch.Size(batch[1:]).numel()),
    )


def build_units_compute_graph(gm: torch.fx.GraphModule, units: UnitPlan) -> torch.fx.GraphModule:
    """The original computation plus the forecast module outputs, ``(B, N)`` float32, as an extra last output."""
    graph, val_map, out = _copy(gm)
    by_name = {n.name: n for n in gm.graph.nodes}
    batch = units.shapes[0][0]
    pieces = []
    for name in units.outputs:
        x = graph.call_function(aten.to.dtype, (val_map[by_name[name]], torch.float32))
        pieces.append(graph.call_function(aten.reshape.default, (x, [batch, -1])))
    flat = graph.call_function(aten.cat.default, (pieces, 1))
    graph.output((*_flat_outputs(out), flat))
    graph.lint()
    return torch.fx.GraphModule(gm, graph, class_name="TCPadeUnitsCompute")


def build_units_predict_graph(gm: torch.fx.GraphModule, units: UnitPlan) -> torch.fx.GraphModule:
    """The original computation with every forecast module removed and its outputs read from a new last input
    ``units`` (the layout :func:`build_units_compute_graph` returns)."""
    graph, val_map, out = _copy(gm)
    by_name = {n.name: n for n in gm.graph.nodes}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_before(placeholders[-1].next):
        flat = graph.placeholder(UNITS_INPUT)
    with graph.inserting_after(flat):
        split = graph.call_function(aten.split_with_sizes.default, (flat, list(units.sizes), 1))
    anchor = split
    for k, (name, shape, dtype) in enumerate(zip(units.outputs, units.shapes, units.dtypes)):
        with graph.inserting_after(anchor):
            piece = graph.call_function(operator.getitem, (split, k))
        with graph.inserting_after(piece):
            x = graph.call_function(aten.view.default, (piece, list(shape)))
        with graph.inserting_after(x):
            x = graph.call_function(aten.to.dtype, (x, dtype))
        with graph.inserting_after(x):
            # a contiguous value, as the module returned: its readers may view it
            x = graph.call_function(aten.clone.default, (x,), {"memory_format": torch.contiguous_format})
        anchor = x
        old = val_map[by_name[name]]
        old.replace_all_uses_with(x)
        out = torch.fx.node.map_arg(out, lambda n, old=old, x=x: x if n is old else n)
    graph.output(tuple(_flat_outputs(out)))
    out_gm = torch.fx.GraphModule(gm, graph, class_name="TCPadeUnitsPredict")
    # the forecast modules and what only they read; a dead dropout (random only in training) goes too
    out_gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure(impure_random=False))
    removed = {val_map[by_name[name]] for name in units.removed}
    for node in reversed(list(out_gm.graph.nodes)):
        if node in removed:
            if node.users:
                raise RuntimeError(f"forecast module node {node.name} is still read by {list(node.users)}")
            out_gm.graph.erase_node(node)  # impure ops DCE keeps
    out_gm.graph.lint()
    out_gm.delete_all_unused_submodules()
    out_gm.recompile()
    return out_gm


__all__ = ["GRANULARITIES", "UNITS_INPUT", "UnitPlan", "build_units_compute_graph", "build_units_predict_graph",
           "locate_forecast_units"]
