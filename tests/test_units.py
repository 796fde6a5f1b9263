"""Module granularity (``Policy(granularity="modules")``): the forecast-unit pass on the five tiny transformers,
the runtime on real tiny pipelines, the refusals, and quality on the trained mnist-dit.
"""

from __future__ import annotations

import re

import pytest
import torch

import tcpade_fx
import tcpade_fx.models
from tcpade_fx import Policy
from tcpade_fx.metrics import psnr
from tcpade_fx.passes import (UNITS_INPUT, UnsupportedModelError, build_graphs, build_units_compute_graph,
                              build_units_predict_graph, capture_graph, locate_block_stack, locate_forecast_units)
from tcpade_fx.testing import TINY_TRANSFORMERS
from tcpade_fx.testing_pipelines import output_of, tiny_dit_pipeline, tiny_flux_pipeline, tiny_wan_pipeline

FAMILIES = sorted(TINY_TRANSFORMERS)

#: Per family, the block children whose outputs are forecast (module names after ``<blocks>.<i>.``).
FORECAST = {
    "dit": {"attn1", "ff"},  # class-conditional: no cross-attention
    "pixart": {"attn1", "attn2", "ff"},
    # the context stream's ff_context only feeds the next block's (forecast) attention: dead on predicted steps
    "sd3": {"attn", "ff"},
    "flux": {"attn", "ff", "ff_context", "proj_out"},
    "wan": {"attn1", "attn2", "ffn"},
}
_PRODUCTS = ("mm", "addmm", "bmm", "linear", "scaled_dot_product", "convolution")


def _capture(family: str):
    module, kwargs = TINY_TRANSFORMERS[family]()
    captured = capture_graph(module, (), kwargs)
    gm = captured.graph_module
    plan = locate_block_stack(gm)
    return module, gm, captured.example_leaves, plan


def _products(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and any(p in str(n.target) for p in _PRODUCTS))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_forecast_units_are_the_attention_and_feed_forward_outputs(family):
    module, gm, leaves, plan = _capture(family)
    units = locate_forecast_units(gm, plan)
    children = {m.split(".")[-1] for m in units.modules}
    assert children == FORECAST[family], units.modules
    blocks = {m.rsplit(".", 1)[0] for m in units.modules}
    assert len(blocks) == plan.num_blocks  # every block has forecast modules
    if family == "flux":  # a single block's attn and proj_mlp only feed its proj_out: not units of their own
        assert not any(m.startswith("single_transformer_blocks") and not m.endswith("proj_out")
                       for m in units.modules)
    batch = units.shapes[0][0]
    assert all(s[0] == batch for s in units.shapes)
    assert units.width == sum(units.sizes) > units.stream_width


@pytest.mark.parametrize("family", FAMILIES)
def test_the_predict_graph_runs_no_product_on_the_stream_and_reproduces_the_output_from_true_units(family):
    module, gm, leaves, plan = _capture(family)
    units = locate_forecast_units(gm, plan)
    compute = build_units_compute_graph(gm, units)
    predict = build_units_predict_graph(gm, units)
    with torch.no_grad():
        *outputs, flat = compute(*leaves)
        reference = gm(*leaves)
        reference = reference[0] if isinstance(reference, (tuple, list)) else reference
        assert torch.equal(outputs[0], reference)
        assert flat.dtype == torch.float32 and flat.shape == (units.shapes[0][0], units.width)
        got = predict(*leaves, flat)
        got = got[0] if isinstance(got, (tuple, list)) else got
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
        # the forecast values are what the output is made of: other values give another output
        moved = predict(*leaves, flat * 1.5)
        moved = moved[0] if isinstance(moved, (tuple, list)) else moved
    assert not torch.allclose(moved, reference, rtol=1e-3, atol=1e-3)
    assert [n.name for n in predict.graph.nodes if n.op == "placeholder"][-1] == UNITS_INPUT
    # what remains of the blocks are norms, modulations and gates: far fewer products than the full graph, and no
    # attention at all
    assert not any("scaled_dot_product" in str(n.target) for n in predict.graph.nodes)
    assert _products(predict) < _products(gm) / 2


def test_module_granularity_needs_static_shapes():
    module, kwargs = TINY_TRANSFORMERS["dit"]()
    with pytest.raises(ValueError, match="static shapes"):
        build_graphs(module, kwargs, dynamic=True, granularity="modules")
    with pytest.raises(ValueError, match="granularity='blocks' is not one of"):
        build_graphs(module, kwargs, granularity="blocks")
    with pytest.raises(ValueError, match=r"granularity='blocks' is not one of \('stack', 'modules'\)"):
        Policy(granularity="blocks")


def test_a_stack_without_products_on_the_stream_is_refused_with_what_to_use():
    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.ones(8))

        def forward(self, x):
            return x * self.gain

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = Scale()

        def forward(self, x):
            return x + torch.tanh(self.scale(x))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj_in = torch.nn.Linear(8, 8)
            self.blocks = torch.nn.ModuleList([Block(), Block()])
            self.proj_out = torch.nn.Linear(8, 8)

        def forward(self, hidden_states, timestep):
            h = self.proj_in(hidden_states) + timestep[:, None, None]
            for block in self.blocks:
                h = block(h)
            return self.proj_out(h)

    module = Model()
    kwargs = {"hidden_states": torch.randn(2, 4, 8), "timestep": torch.ones(2)}
    gm = capture_graph(module, (), kwargs).graph_module
    with pytest.raises(UnsupportedModelError, match="granularity='stack'"):
        locate_forecast_units(gm, locate_block_stack(gm))


MODULES = Policy.preset("balanced").replace(granularity="modules", method="taylor", modulate_denominator=False)
BUILDERS = {"dit": tiny_dit_pipeline, "flux": tiny_flux_pipeline, "wan": tiny_wan_pipeline}


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_pipelines_run_module_granularity_on_the_stack_schedule(family):
    pipe, kwargs = BUILDERS[family]()

    def run(policy):
        tcpade_fx.compile(pipe, policy=policy)
        runtime, reset = pipe.tcpade, pipe.tcpade.reset

        def reset_and_measure():  # a pipeline ends its trajectory with a reset: measure the rings before it
            rings.extend(b.ring.nbytes for b in runtime.branches.values() if b.ring is not None)
            reset()

        runtime.reset = reset_and_measure
        out = output_of(pipe(**kwargs, num_inference_steps=20, generator=torch.Generator().manual_seed(0)))
        stats = pipe.tcpade.stats
        reset_and_measure()
        tcpade_fx.disable(pipe)
        return out, stats

    rings: list[int] = []
    full, _ = run("full")
    stack, stack_stats = run(MODULES.replace(granularity="stack"))
    rings.clear()
    modules, stats = run(MODULES)
    assert torch.isfinite(modules).all() and not torch.equal(modules, full)
    assert stats.decisions() == stack_stats.decisions() and stats.predicted > 0
    assert any("granularity 'modules'" in n and "static shapes" in n for n in stats.notes), stats.notes
    # the note says how much memory the history holds: what each branch's ring allocates
    held = [re.search(r"the history holds ([\d.]+) (B|KiB|MiB|GiB) per guidance branch", n) for n in stats.notes]
    amount, unit = next(m for m in held if m).groups()
    stated = float(amount) * {"B": 1, "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30}[unit]
    assert rings and all(abs(r - stated) <= 0.05 * r for r in rings), (rings, amount, unit)
    # every branch of a separate-call guidance keeps its own unit history, as for the stack
    branches = {r.branch for r in stats.records}
    assert len(branches) == (2 if family == "wan" else 1)
    # a computed step's output is the model's own: the "full" policy under module granularity changes nothing
    same, _ = run(Policy.preset("full").replace(granularity="modules"))
    assert torch.equal(same, full)


def test_export_refuses_module_granularity_with_what_to_do(tmp_path):
    from tcpade_fx.export import to_onnx

    pipe = tcpade_fx.models.load("mnist-dit")
    with pytest.raises(ValueError, match=r"granularity='stack'.*tcpade_fx\.compile"):
        to_onnx(pipe, tmp_path / "x", policy=MODULES)
    assert not (tmp_path / "x").exists()


def test_module_granularity_on_the_trained_dit_tracks_the_full_run():
    """28 steps on balanced's schedule (the cell where the study put module Taylor-1 level with the stack): the
    module forecast must stay close to the full run, and be far better than reusing the stack residual."""
    pipe = tcpade_fx.models.load("mnist-dit")
    labels = [0, 3, 5, 8]

    def run(policy):
        if policy is not None:
            tcpade_fx.compile(pipe, policy=policy)
        gens = [torch.Generator().manual_seed(7000 + i) for i in range(len(labels))]
        out = pipe(labels, num_inference_steps=28, generator=gens, output_type="pt").images
        if policy is not None:
            tcpade_fx.disable(pipe)
        return out

    full = run(None)
    modules = run(MODULES)
    reuse = run(Policy.preset("balanced").replace(method="reuse", order=0, late_order=0,
                                                  modulate_denominator=False, gap_correction=0.0))
    assert psnr(full, modules) > 38.0
    assert psnr(full, modules) > psnr(full, reuse) + 4.0
