"""``backend="inductor"``: each graph compiled once with ``torch.compile(fullgraph=True)`` and inductor.

The compute/predict decision stays in Python, outside the graphs, so a trajectory compiles each graph once.
Graphs captured with static shapes compile with ``dynamic=False`` (the runtime keeps one graph set per input
signature). Graphs captured with symbolic batch/token axes (:mod:`tcpade_fx.passes.dynamic`) compile once with
those axes symbolic (marked on the inputs with ``torch._dynamo.maybe_mark_dynamic``, the other sizes static), and
every later shape along them reuses that compile (a tiny Flux over 3 batch sizes x 3 resolutions: 1 compile per
graph; dynamo's automatic dynamic shapes alone took one more per changing axis).

``backend_options={"regional": True}`` compiles per block instead of one flat graph
(:func:`compile_regional`): the compute graph is split at block boundaries (:mod:`tcpade_fx.passes.regions`),
blocks whose graphs are structurally identical share ONE compile, called with each block's own weights (the
model's tensors, not copies), and the head, the tail and the predict graph compile as before. Stats count one
entry per compiled unit, ``"compute/transformer_blocks"``, ``"compute/head"`` ..., ``"predict"``; each count is the
number of inductor compiles of that unit (a recompile for new strides or shapes adds one).
"""

from __future__ import annotations

import torch

from .registry import Backend, register_backend


def symbolic_axes(gm: torch.fx.GraphModule) -> dict[int, list[int]]:
    """The input positions of ``gm`` captured with symbolic sizes, and their axes (empty for a static capture)."""
    axes = {}
    for i, node in enumerate(gm.graph.find_nodes(op="placeholder")):
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            dims = [d for d, size in enumerate(value.shape) if not isinstance(size, int)]
            if dims:
                axes[i] = dims
    return axes


def has_symbolic_shapes(gm: torch.fx.GraphModule) -> bool:
    """Whether a placeholder of ``gm`` was captured with a symbolic size (a dynamic-shape capture)."""
    return bool(symbolic_axes(gm))


def compile_inductor(gm: torch.fx.GraphModule, name: str, on_compile, regional: bool = False, **options):
    """``options`` go to ``torch.compile`` (e.g. ``mode="max-autotune-no-cudagraphs"``; ``dynamic`` overrides
    the choice above); ``regional``: per-block compilation (:func:`compile_regional`)."""
    if regional:
        return compile_regional(gm, name, on_compile, **options)
    from torch._inductor.compile_fx import compile_fx

    def counting_inductor(graph: torch.fx.GraphModule, example_inputs):
        on_compile(name)
        return compile_fx(graph, example_inputs)

    axes = symbolic_axes(gm)
    options.setdefault("dynamic", None if axes else False)
    compiled = torch.compile(gm, backend=counting_inductor, fullgraph=True, **options)
    if not axes or options["dynamic"] is not None:
        return compiled

    def call_with_dynamic_axes(*args):
        # the capture's symbolic axes, marked on every call's inputs, so that the first compile is already generic
        for i, dims in axes.items():
            torch._dynamo.maybe_mark_dynamic(args[i], dims)
        return compiled(*args)

    return call_with_dynamic_axes


class _Shared(torch.nn.Module):
    """One region of a split graph, run by its group's compiled representative."""

    def __init__(self, fn, group: str):
        super().__init__()
        self.fn, self.group = fn, group

    def forward(self, *args):
        return self.fn(*args)


def compile_regional(gm: torch.fx.GraphModule, name: str, on_compile, **options):
    """``gm`` split by block (:func:`tcpade_fx.passes.regions.split_regions`), one inductor compile per group of
    identical blocks and per non-block region (``on_compile(f"{name}/{group}")``), run by the split graph's Python
    code; a graph without blocks (the predict graph) compiles whole, as :func:`compile_inductor`."""
    from ..passes.regions import group_regions, split_regions

    top = split_regions(gm)
    groups = group_regions(top)
    if len(groups) < 2:
        return compile_inductor(gm, name, on_compile, **options)
    for group, members in groups:
        compiled = compile_inductor(getattr(top, members[0]), f"{name}/{group}", on_compile, **options)
        for member in members:
            setattr(top, member, _Shared(compiled, group))
    return top


BACKEND = register_backend(Backend("inductor", "torch.compile with inductor, each graph once (automatic dynamic "
                                   "shapes for dynamic-shape captures; backend_options={'regional': True}: one "
                                   "compile per group of identical blocks)", compile_graph=compile_inductor))
