"""``backend="inductor"``: each graph compiled once with ``torch.compile(fullgraph=True)`` and inductor.

The compute/predict decision stays in Python, outside the graphs, so a trajectory compiles each graph once.
Graphs captured with static shapes compile with ``dynamic=False`` (the runtime keeps one graph set per input
signature). Graphs captured with symbolic batch/token axes (:mod:`tcpade_fx.passes.dynamic`) compile with dynamo's
automatic dynamic shapes: the first input shape compiles static, the first call at another shape recompiles once
with the sizes that changed left symbolic, and every later shape reuses that compile (measured on a tiny Flux:
4 resolutions, 2 compiles per graph).
"""

from __future__ import annotations

import torch

from .registry import Backend, register_backend


def has_symbolic_shapes(gm: torch.fx.GraphModule) -> bool:
    """Whether a placeholder of ``gm`` was captured with a symbolic size (a dynamic-shape capture)."""
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and any(not isinstance(s, int) for s in value.shape):
            return True
    return False


def compile_inductor(gm: torch.fx.GraphModule, name: str, on_compile, **options):
    """``options`` go to ``torch.compile`` (e.g. ``mode="max-autotune-no-cudagraphs"``; ``dynamic`` overrides
    the choice above)."""
    from torch._inductor.compile_fx import compile_fx

    def counting_inductor(graph: torch.fx.GraphModule, example_inputs):
        on_compile(name)
        return compile_fx(graph, example_inputs)

    options.setdefault("dynamic", None if has_symbolic_shapes(gm) else False)
    return torch.compile(gm, backend=counting_inductor, fullgraph=True, **options)


BACKEND = register_backend(Backend("inductor", "torch.compile with inductor, each graph once (automatic dynamic "
                                   "shapes for dynamic-shape captures)", compile_graph=compile_inductor))
