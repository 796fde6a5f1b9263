"""Context parallelism on torch.distributed: two gloo processes on CPU (``torchrun --nproc-per-node 2``) run the
tiny Flux and Wan pipelines with diffusers' Ulysses and Ring attention, compiled with tcpade_fx.

What is asserted, per scenario of tests/distributed_worker.py:

* both processes take the same decisions, and they are the single-process run's;
* the final latents are the same on both processes and match the single-process run (<= 1e-4);
* the compute graph holds the collectives (Ulysses: all-to-all; Ring: all-gather of K/V);
* with per-process statistics (what a cache that reduces nothing does) the error-controlled policy makes the
  processes disagree, and the decision guard stops both at that call with DivergedDecisionError (no hang);
* export refuses a context-parallel transformer, saying why, and so does the runtime for the input gate.

The two diffusers CPU workarounds (tcpade_fx.testing_distributed.cpu_context_parallel_workarounds) are applied in
the worker processes; the process group has a 60 s timeout and the whole run a subprocess timeout, so that a
deadlock fails instead of hanging CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import distributed_worker as worker

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is needed")

TIMEOUT_S = 300  # the whole two-process run; each collective also times out after 60 s (init_gloo)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    # CPU processes even on a GPU machine (the gloo run is what CI checks): no accelerator visible to them
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.pathsep.join(
        [str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / "distributed_worker.py"), str(out), *worker.SCENARIOS]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the two-process run did not finish in {TIMEOUT_S} s (a deadlock?): {exc.stdout!s:.3000}")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    return {name: [(json.loads((out / f"{name}.rank{r}.json").read_text()),
                    torch.load(out / f"{name}.rank{r}.pt")) for r in (0, 1)] for name in worker.SCENARIOS}


@pytest.fixture(scope="module")
def single_process():
    """The single-process runs of the scenarios' pipelines and policies: decisions per branch and latents."""
    import tcpade_fx

    found = {}
    for name, (model, _, _, policies, reducer) in worker.SCENARIOS.items():
        if reducer is not None:
            continue
        pipe, kwargs = worker.pipeline(model)
        for policy in policies:
            latents = worker.run_pipeline(pipe, kwargs, policy)
            stats = pipe.tcpade.stats
            contexts = sorted({r.context for r in stats.records if r.context})
            decisions = {c: stats.decisions(c) for c in contexts} if contexts else {"0": stats.decisions(0)}
            found[name, policy] = decisions, latents
        tcpade_fx.disable(pipe)
    return found


RUNS = [(name, policy) for name, (_, _, _, policies, reducer) in worker.SCENARIOS.items() if reducer is None
        for policy in policies]


@pytest.mark.parametrize("name,policy", RUNS)
def test_context_parallel_decisions_and_latents_are_the_single_process_run(results, single_process, name, policy):
    (r0, lat0), (r1, lat1) = results[name]
    run0 = next(r for r in r0["runs"] if r["policy"] == policy)
    run1 = next(r for r in r1["runs"] if r["policy"] == policy)
    assert run0["error"] is None and run1["error"] is None
    decisions, latents = single_process[name, policy]
    assert run0["decisions"] == run1["decisions"] == decisions
    assert "." in "".join(decisions.values())  # something was predicted
    assert torch.equal(lat0[policy], lat1[policy])  # the gathered output is the same on both processes
    assert (lat0[policy] - latents).abs().max() <= 1e-4
    assert any("context parallel" in n for n in run0["notes"])
    if policy == "gap":  # Policy.gap_correction applied on every process alike
        corrected = [[r["gap_corrected"] for r in run["records"]] for run in (run0, run1)]
        assert corrected[0] == corrected[1] and any(corrected[0])
    # tcpade_fx's own collectives: two per computed call (the decision + fit, the check), one per predicted call
    # (the decision + fit: a prediction's finiteness is handled on each process's own share), one per capture
    captures = 1
    computed = sum(r["computed"] for r in run0["records"])
    assert run0["cost"]["calls"] == 2 * computed + (run0["calls"] - computed) + captures, run0["cost"]


def test_ulysses_compute_graph_holds_the_all_to_alls_and_ring_the_kv_gathers(results):
    ulysses = results["flux_ulysses_error"][0][0]["runs"][0]["collectives"]
    ring = results["flux_ring_presets"][0][0]["runs"][0]["collectives"]
    wan = results["wan_ulysses_fast"][0][0]["runs"][0]["collectives"]
    assert ulysses["compute"]["all_to_all_single"] == 16  # q, k, v in and the output back, per attention (4)
    assert wan["compute"]["all_to_all_single"] == 8  # self-attention of 2 blocks
    assert "all_to_all_single" not in ring["compute"] and ring["compute"]["all_gather_into_tensor"] == 5  # K/V x 4
    for found in (ulysses, ring, wan):  # the predict graph only gathers the output (proj_out)
        assert found["predict"] == {"all_gather_into_tensor": 1, "wait_tensor": 1}


def test_per_process_statistics_diverge_and_the_guard_stops_every_process(results):
    (r0, _), (r1, _) = results["flux_ulysses_per_process"]
    e0, e1 = r0["runs"][0]["error"], r1["runs"][0]["error"]
    assert e0 and e1, "with per-process statistics the error-controlled policy should make the processes disagree"
    assert "reached different decisions at call 2" in e0 and "reached different decisions at call 2" in e1
    assert "compute 0..1" in e0  # one process would compute, the other predict
    assert "'compute': 1" in e0 + e1 and "'compute': 0" in e0 + e1


def test_export_refuses_context_parallelism(results):
    for name in ("flux_ulysses_error", "flux_ring_presets", "wan_ulysses_fast"):
        for report, _ in results[name]:
            assert report["export"] and "context parallelism enabled" in report["export"]


def test_the_input_gate_is_refused_under_context_parallelism_on_every_process(results):
    """Each process would fit the gate on its own chunk of tokens: refused at the first call, on both processes
    (no hang), saying what to use instead."""
    for name in ("flux_ulysses_error", "flux_ring_presets", "wan_ulysses_fast"):
        for report, _ in results[name]:
            assert report["input_gate"] and "policy.replace(input_gate=False)" in report["input_gate"]


# -- the statistics' shares, without processes ---------------------------------------------------------------------
from hypothesis import given
from hypothesis import strategies as st

from tcpade_fx import pade


def _chunks(x: torch.Tensor, cuts: list[int], dim: int) -> list[torch.Tensor]:
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, x.shape[dim]])]
    return list(torch.split(x, sizes, dim=dim))


def _combined(kind: str, shares: list[torch.Tensor]) -> torch.Tensor:
    return pade.combine_shares(kind, torch.stack([s.double() for s in shares])).float()


@given(seed=st.integers(0, 10_000), world=st.integers(2, 4), batch=st.integers(1, 3),
       loud=st.sampled_from([1.0, 1e-20, 1e30]), method=st.sampled_from(["pade", "taylor"]))
def test_the_shares_of_token_chunks_combine_to_the_statistics_of_the_whole_tensor(seed, world, batch, loud, method):
    """What context parallelism relies on: each process's share of the denominator fit, the relative error and the
    modulation fit, combined, is the statistic of the whole residual, even when the chunks' magnitudes differ by 1e30
    (the shares are normalised by their own scale)."""
    g = torch.Generator().manual_seed(seed)
    tokens, dim = 12, 5
    times = [0.9, 0.8, 0.7]
    base = torch.randn(batch, tokens, dim, generator=g)
    history = [base * (1 + 0.3 * k) + 0.1 * k ** 2 * torch.randn(batch, tokens, dim, generator=g) for k in range(3)]
    history = [h.clone() for h in history]
    for h in history:
        h[:, : tokens // 3] *= loud  # one chunk much louder (or quieter) than the rest
    actual = history[-1] * 1.2 + 0.05 * torch.randn(batch, tokens, dim, generator=g)
    cuts = sorted(torch.randperm(tokens - 1, generator=g)[: world - 1].add(1).tolist())
    target = 0.6

    whole = pade.stack_history(history)
    expected = pade.extrapolate_stacked(times, whole, target, like=history[-1], method=method, order=1)
    parts = [pade.stack_history(c) for c in zip(*(_chunks(h, cuts, 1) for h in history))]
    likes = _chunks(history[-1], cuts, 1)
    fits = [pade.denominator_partials(times, s, target, method=method, order=1) for s in parts]
    fit = None if fits[0] is None else (_combined("scaled", [f[0] for f in fits]),
                                        _combined("sum", [torch.tensor([float(f[1])]) for f in fits])[0])
    got = torch.cat([pade.extrapolate_stacked(times, s, target, like=lk, method=method, order=1, fit=fit)
                     for s, lk in zip(parts, likes)], dim=1)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))

    actual_chunks, expected_chunks = _chunks(actual, cuts, 1), _chunks(expected, cuts, 1)
    error = pade.relative_error_from(_combined("norm", [pade.relative_error_partials(a, p) for a, p in
                                                        zip(actual_chunks, expected_chunks)]))
    assert torch.allclose(error, pade.relative_error(actual, expected), rtol=1e-4)

    taylor = pade.extrapolate_stacked(times, whole, target, like=history[-1], method="taylor", order=1)
    shares = [pade.modulation_partials(a, p, t) for a, p, t in
              zip(actual_chunks, expected_chunks, _chunks(taylor, cuts, 1))]
    mu = pade.modulation_from(_combined("scaled", [s[0] for s in shares]), sum(s[1] for s in shares))
    assert torch.allclose(mu, pade.fit_modulation(actual, expected, taylor), atol=1e-4)

    nonfinite = _combined("sum", [pade.nonfinite_partial(c) for c in actual_chunks])
    assert float(nonfinite) == 0.0
    poisoned = [c.clone() for c in actual_chunks]
    poisoned[-1][0, 0, 0] = float("nan")
    assert float(_combined("sum", [pade.nonfinite_partial(c) for c in poisoned])) == 1.0


def test_one_process_packs_are_their_own_statistics_bit_for_bit():
    pack = pade.StatPack()
    values = [torch.randn(3, 3), torch.tensor([7.0]), torch.randn(4)]
    for kind, v in zip(("scaled", "sum", "max"), values):
        pack.add(kind, v)
    assert all(a is b for a, b in zip(pack.reduce(pade.LOCAL), values))
    # the combinations themselves are the identity on one share
    for kind in pade.KINDS:
        v = torch.rand(2, 3, dtype=torch.float64) + 0.5
        assert torch.equal(pade.combine_shares(kind, v[None]), v)
