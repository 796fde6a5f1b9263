"""Issue 15 part 1: the residual history is a static ring updated in place, so that the extrapolation and the
predict graph read the same tensor storage every step (what CUDA graphs need)."""

from __future__ import annotations

import pytest
import torch

import tcpade_fx
from tcpade_fx.pade import extrapolate_stacked, stack_history
from tcpade_fx.testing_pipelines import tiny_flux_pipeline


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_history_and_predict_input_storages_stay_put_over_a_trajectory():
    pipe, call = tiny_flux_pipeline()
    tcpade_fx.compile(pipe, "balanced")
    runtime = pipe.tcpade
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.no_grad():
        pipe(**call, num_inference_steps=20, generator=gen())  # captures the graphs
    seen = {"ring": set(), "residual": set(), "predicted": 0, "computed": 0, "branches": {}}
    assert runtime.graph_sets == 1
    for graphs in [runtime.graphs]:
        predict, compute = graphs.predict, graphs.compute

        def watched_predict(*leaves, _predict=predict):
            seen["residual"].add(_storage(leaves[-1]))
            seen["ring"].update(_storage(b.ring) for b in runtime.branches.values() if b.ring is not None)
            seen["predicted"] += 1
            seen["branches"].update({id(b): b for b in runtime.branches.values()})
            return _predict(*leaves)

        def watched_compute(*leaves, _compute=compute):
            seen["ring"].update(_storage(b.ring) for b in runtime.branches.values() if b.ring is not None)
            seen["computed"] += 1
            return _compute(*leaves)

        graphs.predict, graphs.compute = watched_predict, watched_compute
    with torch.no_grad():
        pipe(**call, num_inference_steps=20, generator=gen())
    assert seen["predicted"] >= 5 and seen["computed"] >= 5, seen
    assert len(seen["ring"]) == 1 and len(seen["residual"]) == 1, seen
    assert seen["ring"] != seen["residual"]
    (branch,) = seen["branches"].values()
    assert branch.ring.shape[0] == runtime.policy.history_size and branch.ring.dtype == torch.float32
    assert seen["ring"] == {_storage(branch.ring)} and seen["residual"] == {_storage(branch.prediction)}
    # the views of the history are slots of the ring
    assert {_storage(r) for r in branch.residuals} == {_storage(branch.ring)}

@pytest.mark.parametrize("method,order", [("pade", 1), ("pade", 2), ("taylor", 2), ("reuse", 0)])
def test_a_rotated_ring_extrapolates_bit_for_bit_like_the_stacked_history(method, order):
    torch.manual_seed(0)
    times = [0.9, 0.8, 0.65, 0.5]
    hist = [torch.randn(2, 6, 4) * (1 + k) for k in range(4)]
    stacked = stack_history(hist)
    slots = [2, 3, 0, 1]  # slot of each history point, oldest first
    ring = torch.empty_like(stacked)
    for r, s in zip(stacked, slots):
        ring[s].copy_(r)
    kw = dict(like=hist[-1], method=method, order=order, modulation=torch.tensor([0.7, 0.3]), damping=0.9)
    want = extrapolate_stacked(times, stacked, 0.4, **kw)
    out = torch.empty_like(hist[-1])
    got = extrapolate_stacked(times, ring, 0.4, slots=slots, out=out, **kw)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got, want)


def test_a_bfloat16_history_is_read_in_float32():
    torch.manual_seed(0)
    hist = [torch.randn(2, 8) for _ in range(3)]
    ring = stack_history(hist).to(torch.bfloat16)
    got = extrapolate_stacked([0.9, 0.8, 0.7], ring, 0.6, like=hist[-1], slots=[0, 1, 2])
    want = extrapolate_stacked([0.9, 0.8, 0.7], ring.float(), 0.6, like=hist[-1])
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_history_dtype_is_a_validated_policy_field():
    assert tcpade_fx.Policy().history_torch_dtype == torch.float32
    assert tcpade_fx.Policy(history_dtype="model").history_torch_dtype is None
    with pytest.raises(ValueError, match="history_dtype"):
        tcpade_fx.Policy(history_dtype="int8")
