"""backend="inductor": each graph compiles once, whatever the compute/predict schedule (about a minute on 2 cores)."""

from __future__ import annotations

import pytest
import torch

import tcpade_fx
from tcpade_fx import Policy

pytest.importorskip("transformers", reason="diffusers imports transformers for the PixArt pipeline")


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
    assert torch.isfinite(out).all() and stats.notes == []

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
