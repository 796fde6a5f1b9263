"""tcpade_fx.testing.count_host_syncs: what it counts, and the host syncs of a pipeline run (issue 15)."""

from __future__ import annotations

import pytest
import torch

import tcpade_fx
from tcpade_fx.testing import count_host_syncs
from tcpade_fx.testing_pipelines import tiny_flux_pipeline


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
def test_counts_each_kind_of_read_once(grad_mode):
    t = torch.tensor([1.5, 2.0])
    with grad_mode(), count_host_syncs() as counter:
        t.sum().item()
        float(t[0])
        bool(t[1] > 1)
        if t[0] > 0:
            pass
        t.tolist()
        torch.equal(t, t)
        _ = t * 2 + 1  # no read
    assert counter.syncs == 6
    ops = counter.ops()
    assert ops["read:Tensor.tolist"] == 1 and ops["read:aten::equal"] == 1
    # under autograd the reads reach the mode as _local_scalar_dense, under inference_mode as item / is_nonzero
    scalar_reads = {k: v for k, v in ops.items() if k not in ("read:Tensor.tolist", "read:aten::equal")}
    assert sum(scalar_reads.values()) == 4
    assert counter.to_device == 0


def test_tensors_from_python_numbers_for_a_device_are_counted_apart():
    with count_host_syncs() as counter:
        torch.as_tensor([0.1, 0.2], device="cpu")
        torch.tensor(3.0, device="cpu")
        torch.as_tensor(torch.ones(2), device="cpu")  # a tensor already: no copy from Python data
        torch.tensor([1.0, 2.0])  # built on the host, for the host: no transfer
    assert counter.syncs == 0
    assert counter.to_device == 2 and counter.staged == 0


def test_fake_tensor_reads_are_not_counted():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with count_host_syncs() as counter, FakeTensorMode():
        x = torch.ones(3)
        (x * 2).shape  # noqa: B018
    assert counter.syncs == 0


def _run(pipe, call, steps=10):
    with torch.no_grad(), count_host_syncs(pipe.transformer) as counter:
        pipe(**call, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
    return counter


def test_untouched_pipeline_has_no_syncs_and_calls_are_recorded():
    pipe, call = tiny_flux_pipeline()
    counter = _run(pipe, call)
    assert counter.syncs == 0
    assert counter.per_kind() == {"plain": [0] * 10}


def test_call_kinds_follow_the_runtime_records():
    pipe, call = tiny_flux_pipeline()
    tcpade_fx.compile(pipe, "balanced")
    first = _run(pipe, call)
    second = _run(pipe, call)
    schedule = pipe.tcpade.stats.decisions(0)
    assert [c.kind for c in first.calls][0] == "first"
    kinds = ["computed" if s == "C" else "predicted" for s in schedule]
    assert [c.kind for c in second.calls] == kinds
    assert [c.kind for c in first.calls][1:] == kinds[1:]
    # the calls' syncs and the ones outside them add up to the total
    assert sum(c.syncs for c in second.calls) + second.outside == second.syncs


def test_issue15_target_no_sync_on_predicted_at_most_one_on_computed():
    pipe, call = tiny_flux_pipeline()
    tcpade_fx.compile(pipe, "balanced")
    _run(pipe, call)
    per_kind = _run(pipe, call).per_kind()
    assert max(per_kind["predicted"]) == 0
    assert max(per_kind["computed"]) <= 1


def _model_times(pipe) -> list[float]:
    """The timestep each step's transformer call receives: the Flux pipeline passes the scheduler's t / 1000."""
    return [float(x) for x in (pipe.scheduler.timesteps / 1000).to(torch.float32)]


def test_steps_are_taken_at_the_scheduler_grid_times_the_model_receives():
    pipe, call = tiny_flux_pipeline()
    tcpade_fx.compile(pipe, "balanced")
    _run(pipe, call)
    stats = pipe.tcpade.stats
    assert [r.time for r in stats.records] == pytest.approx(_model_times(pipe), rel=1e-6)
    assert not any("grid" in n for n in stats.notes), stats.notes


def _driven_dit(times, grid, steps=20):
    """A tiny DiT driven like a pipeline (begin with the scheduler's grid, step_done after each step), at the model
    times ``times``; returns the runtime and the counter."""
    from tcpade_fx.testing import tiny_dit

    module, kwargs = tiny_dit()
    tcpade_fx.compile(module, "balanced")
    runtime = module.tcpade
    batch = kwargs["hidden_states"].shape[0]
    with torch.no_grad(), count_host_syncs(module) as counter:
        runtime.begin(steps, schedule=[grid])
        for t in times:
            module(**{**kwargs, "timestep": torch.full((batch,), t)})
            runtime.step_done()
    return runtime, counter


def test_a_model_time_off_the_scheduler_grid_is_found_and_read_from_then_on():
    steps = 20
    grid = [1 - i / steps for i in range(steps)]
    off_grid = [500 * g * g + 25 for g in grid]  # neither the grid nor a multiple of it
    runtime, counter = _driven_dit(off_grid, grid, steps)
    stats = runtime.stats
    # found at step 1 (a computed warm-up step, before any prediction): that step is re-timed, the histories restart
    assert any("step 1: the model's timestep" in n and "does not follow the scheduler's time grid" in n
               for n in stats.notes), stats.notes
    assert any("step 1: the model's timestep" in n and "every history restarted" in n for n in stats.notes)
    assert [r.time for r in stats.records] == pytest.approx(off_grid, rel=1e-6)
    assert stats.records[1].check_error is None and stats.predicted > 0
    assert max(counter.per_kind()["predicted"]) == 1  # the time, read at every call from then on
    # on the grid (scaled by 1000): no note, no read on a predicted call, the times are the grid's
    runtime, counter = _driven_dit([1000 * g for g in grid], grid, steps)
    assert not any("grid" in n for n in runtime.stats.notes), runtime.stats.notes
    assert [r.time for r in runtime.stats.records] == pytest.approx([1000 * g for g in grid], rel=1e-6)
    assert max(counter.per_kind()["predicted"]) == 0 and max(counter.per_kind()["computed"]) == 1


def test_a_bare_transformer_reads_its_time_at_every_call():
    from tcpade_fx.testing import tiny_dit

    module, kwargs = tiny_dit()
    tcpade_fx.compile(module, "balanced")
    steps = 20
    with torch.no_grad(), count_host_syncs(module) as counter:
        module.tcpade.begin(steps)
        for i in range(steps):
            batch = kwargs["hidden_states"].shape[0]
            module(**{**kwargs, "timestep": torch.full((batch,), 1000.0 * (1 - i / steps))})
    per_kind = counter.per_kind()
    assert module.tcpade.stats.predicted > 0
    assert max(per_kind["predicted"]) == 1 and max(per_kind["computed"]) == 2
