"""backend="inductor": each graph compiles once, whatever the compute/predict schedule (about a minute on 2 cores)."""

from __future__ import annotations

import pytest
import torch

import tcpade_fx
from tcpade_fx import Policy

pytest.importorskip("transformers", reason="diffusers imports transformers for the PixArt pipeline")


def other_notes(stats) -> list[str]:
    """The notes besides the one saying that "balanced"'s gap correction does not apply to a non-Euler sampler."""
    return [n for n in stats.notes if not n.startswith("Policy.gap_correction is not applied")]


@pytest.mark.slow
def test_inductor_compiles_each_graph_once_over_a_mixed_50_step_trajectory():
    from tcpade_fx.testing_pipelines import output_of, tiny_pixart_pipeline

    pipe, kwargs = tiny_pixart_pipeline()

    def run(steps=50):
        return output_of(pipe(**kwargs, num_inference_steps=steps, generator=torch.Generator().manual_seed(0)))

    reference = run()  # untouched, eager
    tcpade_fx.compile(pipe, policy="balanced", backend="inductor")
    out = run()
    stats = pipe.tcpade.stats
    schedule = stats.decisions()
    assert "C." in schedule and ".C" in schedule, schedule  # the mode switches back and forth
    assert stats.compiles == {"compute": 1, "predict": 1}, stats.summary()
    assert torch.isfinite(out).all() and other_notes(stats) == []

    # the same compiled graphs under "full" (the runtime's policy is read per trajectory): still 0 recompiles,
    # and the compiled compute graph matches the untouched eager pipeline
    pipe.tcpade.policy = Policy.preset("full")
    full = run()
    assert pipe.tcpade.stats.compute_fraction == 1.0
    assert pipe.tcpade.stats.compiles == {"compute": 1, "predict": 1}
    assert float((full - reference).norm() / reference.norm()) < 1e-4


@pytest.mark.slow
def test_inductor_serves_new_resolutions_without_a_compile_each():
    """A dynamic-shape capture compiles each graph once, with its symbolic axes, however many resolutions follow;
    "full" stays equal to the untouched pipeline."""
    from tcpade_fx.testing_pipelines import output_of, tiny_flux_pipeline

    pipe, kwargs = tiny_flux_pipeline()

    def run(size, steps=10):
        return output_of(pipe(**dict(kwargs, height=size, width=size), num_inference_steps=steps,
                              generator=torch.Generator().manual_seed(0)))

    sizes = (16, 32, 48, 24)
    reference = {size: run(size) for size in sizes}
    tcpade_fx.compile(pipe, policy="full", backend="inductor")
    for size in sizes:
        got = run(size)
        assert float((got - reference[size]).norm() / reference[size].norm()) < 1e-4, size
    assert pipe.tcpade.graph_sets == 1
    assert pipe.tcpade.stats.compiles["compute"] == 1, pipe.tcpade.stats.summary()

    pipe.tcpade.policy = Policy.preset("balanced")
    for size in sizes[:3]:
        out = run(size, steps=12)
        assert torch.isfinite(out).all() and pipe.tcpade.stats.predicted > 0
    assert pipe.tcpade.stats.compiles == {"compute": 1, "predict": 1}, pipe.tcpade.stats.summary()
    assert pipe.tcpade.graph_sets == 1
    tcpade_fx.disable(pipe)


@pytest.mark.slow
def test_regional_inductor_compiles_once_per_block_group_and_serves_new_resolutions():
    """backend_options={"regional": True}: the 2 dual + 2 single Flux blocks compile as 2 graphs (one per group of
    identical blocks, each block called with its own weights), plus the head and the tail; a dynamic-shape capture
    keeps serving new resolutions from the same compiles, "full" equal to the untouched pipeline; the weights stay
    the model's own tensors."""
    from tcpade_fx.testing_pipelines import output_of, tiny_flux_pipeline

    pipe, kwargs = tiny_flux_pipeline()

    def run(size, steps=6):
        return output_of(pipe(**dict(kwargs, height=size, width=size), num_inference_steps=steps,
                              generator=torch.Generator().manual_seed(0)))

    sizes = (16, 32)
    reference = {size: run(size) for size in sizes}
    tcpade_fx.compile(pipe, policy="full", backend="inductor", backend_options={"regional": True})
    for size in sizes:
        got = run(size)
        assert float((got - reference[size]).norm() / reference[size].norm()) < 1e-4, size
    groups = {"compute/head": 1, "compute/transformer_blocks": 1, "compute/single_transformer_blocks": 1,
              "compute/tail": 1}
    assert pipe.tcpade.stats.compiles == {**groups, "predict": 1}, pipe.tcpade.stats.summary()
    assert pipe.tcpade.graph_sets == 1

    pipe.tcpade.policy = Policy.preset("balanced")
    for size in sizes:
        out = run(size, steps=10)
        assert torch.isfinite(out).all() and pipe.tcpade.stats.predicted > 0
    assert pipe.tcpade.stats.compiles == {**groups, "predict": 1}, pipe.tcpade.stats.summary()
    tcpade_fx.disable(pipe)


def test_split_regions_shares_the_weights_and_groups_identical_blocks():
    """The pass alone (no compiler): same outputs as the flat graph, the model's own parameter objects, one group
    per block list."""
    from tcpade_fx.passes.pipeline import build_graphs
    from tcpade_fx.passes.regions import group_regions, split_regions
    from tcpade_fx.testing import tiny_flux_transformer

    torch.manual_seed(0)
    model = tiny_flux_transformer()
    g = torch.Generator().manual_seed(0)
    kwargs = {"hidden_states": torch.randn(1, 16, 8, generator=g),
              "encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
              "pooled_projections": torch.randn(1, 16, generator=g), "timestep": torch.full((1,), 1.0),
              "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(8, 3), "return_dict": False}
    graphs = build_graphs(model, kwargs, verify=False)
    top = split_regions(graphs.compute)
    assert [(name, len(members)) for name, members in group_regions(top)] == [
        ("head", 1), ("transformer_blocks", 2), ("single_transformer_blocks", 2), ("tail", 1)]
    with torch.no_grad():
        for a, b in zip(graphs.compute(*graphs.leaves), top(*graphs.leaves)):
            assert torch.equal(a, b)
    ours = {id(p) for p in model.parameters()}
    assert {id(p) for p in top.parameters()} <= ours
    regions = [m for name, m in top.named_children() if name.startswith("region_")]
    assert len(regions) == 6 and not any(True for region in regions for _ in region.parameters())  # lifted


def _compiled_run(pipe, kwargs, policy, backend):
    """20 steps of ``pipe`` compiled with ``policy`` on ``backend`` (seed 0), then disabled: (output, stats)."""
    from tcpade_fx.testing_pipelines import output_of

    tcpade_fx.compile(pipe, policy=policy, backend=backend)
    out = output_of(pipe(**kwargs, num_inference_steps=20, generator=torch.Generator().manual_seed(0)))
    stats = pipe.tcpade.stats
    tcpade_fx.disable(pipe)
    return out, stats


@pytest.mark.slow
def test_inductor_runs_module_granularity_as_eager_does():
    """granularity="modules": the units compute/predict graphs compile once each and give the eager outputs."""
    from tcpade_fx.testing_pipelines import tiny_pixart_pipeline

    pipe, kwargs = tiny_pixart_pipeline()
    policy = Policy.preset("balanced").replace(granularity="modules", method="taylor", modulate_denominator=False)
    eager, eager_stats = _compiled_run(pipe, kwargs, policy, "eager")
    compiled, stats = _compiled_run(pipe, kwargs, policy, "inductor")
    assert stats.decisions() == eager_stats.decisions() and stats.predicted > 0
    assert stats.compiles == {"compute": 1, "predict": 1}, stats.summary()
    assert float((compiled - eager).norm() / eager.norm()) < 1e-3


@pytest.mark.slow
def test_inductor_runs_the_input_gate_as_eager_does():
    """Policy.input_gate: the gated graphs (compute returns the stack input, predict blends in the gate) compile once
    each and give the eager outputs, which the gate moved away from the ungated run."""
    from tcpade_fx.testing_pipelines import tiny_pixart_pipeline

    pipe, kwargs = tiny_pixart_pipeline()
    gated = Policy.preset("balanced").replace(input_gate=True)
    eager, eager_stats = _compiled_run(pipe, kwargs, gated, "eager")
    plain, _ = _compiled_run(pipe, kwargs, "balanced", "eager")
    compiled, stats = _compiled_run(pipe, kwargs, gated, "inductor")
    assert stats.decisions() == eager_stats.decisions() and stats.predicted > 0
    assert stats.compiles == {"compute": 1, "predict": 1}, stats.summary()
    assert float((compiled - eager).norm() / eager.norm()) < 1e-3
    assert float((compiled - eager).norm()) < 0.1 * float((plain - eager).norm())
