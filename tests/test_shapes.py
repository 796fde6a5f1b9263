"""Shapes without a capture each: graphs captured with symbolic batch and token axes run other resolutions and
batch sizes (each checked once against the eager forward), and what must be captured per signature is bounded."""

from __future__ import annotations

import torch

import tcpade_fx
from tcpade_fx.testing import tiny_dit, tiny_flux


def _eager(module, kwargs):
    with torch.no_grad():
        return type(module).forward(module, **kwargs)[0]


def test_a_flux_sweep_of_12_resolutions_and_3_batch_sizes_reuses_one_graph_set():
    module, _ = tiny_flux(batch=2)
    tcpade_fx.compile(module, "full", max_graph_sets=3)
    runtime = module.tcpade
    shapes = [(batch, side * side) for side in range(2, 14) for batch in (2, 3, 1)]
    for i, (batch, tokens) in enumerate(shapes):
        _, kwargs = tiny_flux(batch=batch, image_tokens=tokens, seed=tokens)
        kwargs["timestep"] = torch.full((batch,), 1.0 - i / len(shapes))  # one trajectory, a step per call
        with torch.no_grad():
            out = module(**kwargs)[0]
        assert torch.equal(out, _eager(module, kwargs)), (batch, tokens)
        assert runtime.graph_sets <= 3
    assert runtime.graph_sets == 1  # image tokens and batch are dynamic in the Flux graphs
    assert runtime.stats.captures == 1


def test_a_model_with_a_fixed_token_grid_is_bounded_by_the_lru():
    module, _ = tiny_dit(batch=2)
    tcpade_fx.compile(module, "full", max_graph_sets=2)
    runtime = module.tcpade
    captures = 0
    for size in (8, 12, 16, 8):  # DiT fixes its token grid: each resolution is a capture; batch stays dynamic
        for batch in (2, 3):
            _, base = tiny_dit(batch=batch)
            kwargs = {**base, "hidden_states": torch.randn(batch, 4, size, size)}
            before = runtime.stats.captures
            with torch.no_grad():
                out = module(**kwargs)[0]
            captures += runtime.stats.captures - before
            assert torch.equal(out, _eager(module, kwargs)), (size, batch)
            assert runtime.graph_sets <= 2
    assert captures == 4  # 8, 12, 16, then 8 again (evicted): one capture per resolution, none per batch
    assert sum("least recently used" in n for n in runtime.stats.notes) == 2
    runtime.clear_graphs()
    assert runtime.graph_sets == 0
