"""Capture a transformer call as a flat FX graph with torch.export (non-strict)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree


@dataclass
class CapturedGraph:
    """A transformer call as a GraphModule taking the flattened call leaves and returning the flat outputs.

    ``in_spec``/``out_spec`` are the pytree specs of ``(args, kwargs)`` and of the output; non-tensor leaves
    (``return_dict=False``, ints) are specialised in the graph but still passed positionally.
    """

    graph_module: torch.fx.GraphModule
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    example_leaves: list[Any]


def ordered_kwargs(kwargs: dict, in_spec: pytree.TreeSpec) -> dict:
    """``kwargs`` reordered like the captured call (pytree specs of dicts are order-sensitive)."""
    keys = in_spec.child(1).context
    if set(keys) != set(kwargs):
        return kwargs
    return {k: kwargs[k] for k in keys}


def flatten_call(args: tuple, kwargs: dict, in_spec: pytree.TreeSpec | None = None) -> tuple[list, pytree.TreeSpec]:
    if in_spec is not None:
        kwargs = ordered_kwargs(kwargs, in_spec)
    return pytree.tree_flatten((tuple(args), dict(kwargs)))


def strip_assertions(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Remove export's runtime metadata assertions: they are checks, and they keep dead producers alive."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in (
            torch.ops.aten._assert_tensor_metadata.default,
            torch.ops.aten._assert_scalar.default,
        ):
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def capture_graph(
    module: torch.nn.Module, args: tuple = (), kwargs: dict | None = None, dynamic_shapes: Any = None
) -> CapturedGraph:
    """Export ``module(*args, **kwargs)`` into a flat-input GraphModule whose parameters are the module's own.

    ``dynamic_shapes`` is passed to ``torch.export.export`` unchanged (default: static shapes, as the runtime
    wants); the exporters use it to keep the batch axis symbolic in the graphs they write.

    Raises a RuntimeError naming the module when torch.export cannot capture it.
    """
    kwargs = dict(kwargs or {})
    try:
        with torch.no_grad():
            ep = torch.export.export(module, tuple(args), kwargs, strict=False, dynamic_shapes=dynamic_shapes)
    except Exception as exc:  # export errors are many and deep; keep the cause attached
        raise RuntimeError(
            f"tcpade_fx could not capture {type(module).__name__} with torch.export (non-strict): {exc}. "
            "Check that the transformer runs without data-dependent Python control flow for these inputs."
        ) from exc
    src = ep.module()
    gm = torch.fx.GraphModule(src, src.graph, class_name=f"Captured{type(module).__name__}")
    gm.graph._codegen = torch.fx.graph.CodeGen()
    gm.recompile()
    strip_assertions(gm)
    leaves, _ = flatten_call(args, kwargs, ep.call_spec.in_spec)
    return CapturedGraph(gm, ep.call_spec.in_spec, ep.call_spec.out_spec, leaves)
