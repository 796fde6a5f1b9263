"""``backend="inductor"``: each graph compiled once with ``torch.compile(fullgraph=True)`` and inductor.

The compute/predict decision stays in Python, outside the graphs, so a trajectory compiles each graph once
(static shapes: the runtime keeps one graph set per input signature).
"""

from __future__ import annotations

import torch

from .registry import Backend, register_backend


def compile_inductor(gm: torch.fx.GraphModule, name: str, on_compile, **options):
    """``options`` go to ``torch.compile`` (e.g. ``mode="max-autotune-no-cudagraphs"``)."""
    from torch._inductor.compile_fx import compile_fx

    def counting_inductor(graph: torch.fx.GraphModule, example_inputs):
        on_compile(name)
        return compile_fx(graph, example_inputs)

    return torch.compile(gm, backend=counting_inductor, fullgraph=True, dynamic=False, **options)


BACKEND = register_backend(Backend("inductor", "torch.compile with inductor, each graph once",
                                   compile_graph=compile_inductor))
