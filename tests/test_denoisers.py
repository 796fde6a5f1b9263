"""Every denoiser of a pipeline is accelerated: Wan 2.2's two experts (``transformer`` for the high-noise steps,
``transformer_2`` for the rest), each with its own runtime and histories, steps numbered by the scheduler."""

from __future__ import annotations

import pytest
import torch

import tcpade_fx
from tcpade_fx.testing_pipelines import output_of, tiny_wan_pipeline

pytest.importorskip("transformers")
STEPS = 20


def _run(pipe, kwargs) -> torch.Tensor:
    return output_of(pipe(**kwargs, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0)))


@pytest.fixture(scope="module")
def wan22():
    pipe, kwargs = tiny_wan_pipeline(two_experts=True)
    return pipe, kwargs, _run(pipe, kwargs)


def test_both_experts_are_cached_with_their_own_runtimes(wan22):
    pipe, kwargs, reference = wan22
    tcpade_fx.compile(pipe, "balanced")
    try:
        out = _run(pipe, kwargs)
        runtimes = pipe.tcpade_denoisers
        assert set(runtimes) == {"transformer", "transformer_2"}
        assert pipe.transformer.tcpade is runtimes["transformer"] and pipe.transformer_2.tcpade is runtimes["transformer_2"]
        high, low = (runtimes[n].stats for n in ("transformer", "transformer_2"))
        assert high.predicted > 0 and low.predicted > 0, (high.summary(), low.summary())
        high_steps, low_steps = {r.step for r in high.records}, {r.step for r in low.records}
        # the scheduler numbers the steps: the experts split the trajectory, the low-noise one starts part-way
        assert high_steps and low_steps and max(high_steps) < min(low_steps)
        assert high_steps | low_steps == set(range(STEPS))
        assert {r.context for r in low.records} == {"cond", "uncond"}
        assert low.records[-1].computed  # the trajectory's last step is the low-noise expert's, computed
        assert torch.isfinite(out).all() and not torch.equal(out, reference)
        # a second call: fresh trajectories, nothing piles up
        _run(pipe, kwargs)
        assert len(runtimes["transformer"].stats.records) == len(high.records)
        assert len(runtimes["transformer_2"].stats.records) == len(low.records)
    finally:
        tcpade_fx.disable(pipe)
    assert not hasattr(pipe.transformer_2, "tcpade") and not hasattr(pipe, "tcpade_denoisers")


def test_full_equals_the_original_with_two_experts(wan22):
    pipe, kwargs, reference = wan22
    tcpade_fx.compile(pipe, "full")
    try:
        assert torch.equal(_run(pipe, kwargs), reference)
    finally:
        tcpade_fx.disable(pipe)
    assert torch.equal(_run(pipe, kwargs), reference)
