"""Split a captured graph into head / body / tail submodules."""

from __future__ import annotations

import torch
from torch.fx.passes.split_module import split_module

from .locate import BlockStackPlan

HEAD, BODY, TAIL = 0, 1, 2


def partition_of(gm: torch.fx.GraphModule, plan: BlockStackPlan) -> dict[str, int]:
    """Partition index per node name: the body, what depends on it (tail), everything else (head)."""
    part: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.name in plan.body_nodes:
            part[node.name] = BODY
        elif any(part.get(a.name) in (BODY, TAIL) for a in node.all_input_nodes):
            part[node.name] = TAIL
        else:
            part[node.name] = HEAD
    return part


def split_head_body_tail(gm: torch.fx.GraphModule, plan: BlockStackPlan) -> torch.fx.GraphModule:
    """A GraphModule calling ``submod_0`` (head), ``submod_1`` (body) and ``submod_2`` (tail) in order.

    Same inputs and outputs as ``gm``; parameters are shared with ``gm``, not copied.
    """
    part = partition_of(gm, plan)
    return split_module(gm, gm, lambda node: part[node.name], keep_original_order=True)
