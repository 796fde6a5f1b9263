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
