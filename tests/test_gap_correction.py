"""Policy.gap_correction: a gap's integral error cancelled on the computed step that ends it.

Numerics (tcpade_fx.pade.gap_integral_weights / gap_miss) as hypothesis properties; then the runtime on
tiny diffusers pipelines (where it applies, where it refuses or notes), and one quality check on a trained model on
seeds no study chose with.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tcpade_fx
from tcpade_fx import Policy
from tcpade_fx.pade import gap_integral_weights, gap_miss

FAST = settings(max_examples=80, deadline=None)


@st.composite
def nodes_and_gap(draw):
    """2–4 distinct node times (either direction, any scale and offset) and 1–5 gap times with weights."""
    n = draw(st.integers(2, 4))
    h = 10.0 ** draw(st.floats(-3.0, 3.0))
    sign = draw(st.sampled_from([-1.0, 1.0]))
    start = draw(st.floats(-1e3, 1e3))
    steps = [h * draw(st.floats(0.2, 1.0)) for _ in range(n - 1)]
    nodes = [start + sign * sum(steps[:i]) for i in range(n)]
    lo, hi = min(nodes), max(nodes)
    gap = [draw(st.floats(lo, hi)) for _ in range(draw(st.integers(1, 5)))]
    weights = [draw(st.floats(-2.0, 2.0)) for _ in gap]
    return nodes, gap, weights


@FAST
@given(nodes_and_gap(), st.data())
def test_weights_sum_polynomials_below_the_node_count_exactly(case, data):
    nodes, gap, weights = case
    coefficients = [data.draw(st.floats(-3.0, 3.0)) for _ in nodes]  # degree len(nodes) - 1
    origin, span = nodes[-1], max(abs(t - nodes[-1]) for t in nodes)

    def poly(t):
        u = (t - origin) / span
        return sum(c * u**k for k, c in enumerate(coefficients))

    W = gap_integral_weights(nodes, gap, weights)
    got = sum(w * poly(t) for w, t in zip(W, nodes))
    want = sum(g * poly(t) for g, t in zip(weights, gap))
    scale = sum(abs(g) for g in weights) * sum(abs(c) for c in coefficients) + 1e-12
    assert math.isclose(got, want, rel_tol=1e-7, abs_tol=1e-7 * scale)


@FAST
@given(nodes_and_gap())
def test_weights_at_the_nodes_themselves_pick_the_node(case):
    nodes, _, _ = case
    W = gap_integral_weights(nodes, [nodes[1]], [2.5])
    assert [round(w, 9) for w in W] == [2.5 if j == 1 else 0.0 for j in range(len(nodes))]


def test_weights_refuse_repeated_nodes_and_mismatched_gaps():
    with pytest.raises(ValueError, match="distinct"):
        gap_integral_weights([1.0, 1.0, 0.5], [0.8], [1.0])
    with pytest.raises(ValueError, match="gap times"):
        gap_integral_weights([1.0, 0.5], [0.8, 0.7], [1.0])


@FAST
@given(nodes_and_gap(), st.integers(1, 3), st.integers(1, 30), st.floats(-3, 3), st.integers(0, 2**31 - 1))
def test_the_miss_is_zero_when_the_gap_stepped_with_the_interpolant_and_linear_in_what_it_missed(
        case, rows, width, log_scale, seed):
    nodes_t, gap, weights = case
    g = torch.Generator().manual_seed(seed)
    nodes = [torch.randn(rows, width, generator=g) * 10.0**log_scale for _ in nodes_t]
    W = gap_integral_weights(nodes_t, gap, weights)
    on_interpolant = sum(w * r for w, r in zip(W, nodes))
    tol = 1e-5 * float(sum(abs(w) for w in W) * max(float(n.abs().max()) for n in nodes)) + 1e-30
    assert float(gap_miss(on_interpolant, nodes, W, 1.7).abs().max()) <= 1.7 * tol
    missed = torch.randn(rows, width, generator=g) * 10.0**log_scale
    miss = gap_miss(on_interpolant + missed, [n.bfloat16() if k == 0 else n for k, n in enumerate(nodes)], W, 0.5)
    assert miss.dtype == torch.float32 and miss.shape == nodes[-1].shape
    bf16 = float(sum(abs(w) for w in W[:1])) * float(nodes[0].abs().max()) * 2**-7  # the bfloat16 node's rounding
    assert float((miss - 0.5 * missed).abs().max()) <= 0.5 * (tol + bf16 + 1e-5 * float(missed.abs().max()))


def test_policy_refuses_a_gap_correction_it_cannot_run():
    for bad in (-0.1, 2.5, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="gap_correction"):
            Policy(gap_correction=bad)
    assert Policy(gap_correction=0.5).gap_correction == 0.5
    for bad in (0.0, -1.0, float("nan"), True, "0.15"):
        with pytest.raises(ValueError, match="gap_span_limit"):
            Policy(gap_span_limit=bad)
    assert Policy(gap_span_limit=math.inf).gap_span_limit == math.inf
    assert Policy().gap_space == "sample" and Policy(gap_space="residual").gap_space == "residual"
    for bad in ("latent", None, 1):
        with pytest.raises(ValueError, match="gap_space"):
            Policy(gap_space=bad)


# -- the runtime on tiny pipelines -----------------------------------------------------------------------------
pytest.importorskip("transformers", reason="diffusers imports transformers for the Wan and Flux pipelines")


def _run(pipe, kwargs, steps: int):
    from tcpade_fx.testing_pipelines import output_of

    return output_of(pipe(**kwargs, num_inference_steps=steps, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("limit,space", [(math.inf, "sample"), (0.05, "sample"), (math.inf, "residual")])
def test_on_an_euler_flow_pipeline_it_corrects_computed_steps_after_gaps_only(limit, space):
    """Wan (two guidance calls per step, FlowMatchEuler shift 3): the schedule is the uncorrected policy's, the
    computed steps that end a gap past the early stage and within gap_span_limit are the corrected ones, in either
    gap_space; nothing else changes."""
    from tcpade_fx.testing_pipelines import tiny_wan_pipeline

    pipe, kwargs = tiny_wan_pipeline()
    reference = _run(pipe, kwargs, 16)
    tcpade_fx.compile(pipe, policy=Policy.preset("balanced").replace(gap_correction=0.0))
    plain = _run(pipe, kwargs, 16)
    plain_decisions = {c: pipe.tcpade.stats.decisions(c) for c in ("cond", "uncond")}
    tcpade_fx.compile(pipe, policy=Policy.preset("balanced").replace(gap_correction=1.0, gap_span_limit=limit,
                                                                    gap_space=space))
    corrected = _run(pipe, kwargs, 16)
    sigmas = pipe.scheduler.sigmas.tolist()
    stats = pipe.tcpade.stats
    assert {c: stats.decisions(c) for c in ("cond", "uncond")} == plain_decisions
    assert bool(torch.isfinite(corrected).all()) and not torch.equal(corrected, plain)
    by_step = {}
    for r in stats.records:
        by_step.setdefault(r.branch, []).append(r)
    early = Policy.preset("balanced").early_end * 15
    limited = False
    for records in by_step.values():
        flags = "".join("C" if r.computed else "." for r in records)
        for i, r in enumerate(records):
            after_gap = r.computed and i > 0 and flags[i - 1] == "."
            older = [q.step for q in records[:i] if q.computed][-2:]
            within = bool(older) and (r.step == 15  # the last step: exempt
                                      or (sigmas[older[-1]] - sigmas[r.step]) ** 2 <= limit * sigmas[r.step])
            expected = after_gap and len(older) == 2 and min(older) >= early and within
            assert r.gap_corrected == expected, (i, flags)
            skipped_for_span = after_gap and len(older) == 2 and min(older) >= early and not within
            limited = limited or skipped_for_span
        assert any(r.gap_corrected for r in records)
    # shift 3 packs long gaps at low noise at the end: a limit of 0.05 leaves some of them uncorrected (the default
    # 0.15 corrects every gap of this 16-step run)
    assert limited == math.isfinite(limit)
    rel = lambda a: float((a - reference).norm() / reference.norm())  # noqa: E731
    assert rel(corrected) < 3 * rel(plain) + 1e-3  # random weights: it must not wreck the run either


def test_zero_correction_and_the_full_policy_correct_nothing_and_the_presets_ship_it():
    from tcpade_fx.testing_pipelines import tiny_flux_pipeline

    assert all(Policy.preset(name).gap_correction == 1.0 for name in ("quality", "balanced", "fast"))
    assert Policy.preset("quality").gap_span_limit == math.inf
    assert Policy.preset("balanced").gap_span_limit == Policy.preset("fast").gap_span_limit == 0.15
    pipe, kwargs = tiny_flux_pipeline()  # 20 steps: at 12, every gap of "balanced" is beyond gap_span_limit
    tcpade_fx.compile(pipe, policy="balanced")
    corrected = _run(pipe, kwargs, 20)
    assert any(r.gap_corrected for r in pipe.tcpade.stats.records)
    tcpade_fx.compile(pipe, policy=Policy.preset("balanced").replace(gap_correction=0.0))
    plain = _run(pipe, kwargs, 20)
    assert not any(r.gap_corrected for r in pipe.tcpade.stats.records) and not torch.equal(plain, corrected)
    tcpade_fx.disable(pipe)
    reference = _run(pipe, kwargs, 20)
    tcpade_fx.compile(pipe, policy=Policy.preset("full").replace(gap_correction=1.0))
    got = _run(pipe, kwargs, 20)
    assert float((got - reference).norm() / reference.norm()) < 1e-4
    assert not any(r.gap_corrected for r in pipe.tcpade.stats.records)


def _latents_per_step(pipe, kwargs, steps: int) -> list[torch.Tensor]:
    seen = []

    def keep(pipe, i, t, tensors):
        seen.append(tensors["latents"].clone())
        return tensors

    pipe(**kwargs, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), callback_on_step_end=keep,
         callback_on_step_end_tensor_inputs=["latents"])
    return seen


@pytest.mark.parametrize("space", ["sample", "residual"])
def test_where_the_correction_lands(space):
    """Mask "CCCCCCC.CC": the one gap's correction is measured at step 8. gap_space="sample" takes it off step 8's
    own output: the latents agree with the uncorrected run through step 7 and move at step 8 by exactly κ times one
    term (κ = 0.5 moves them half as far as κ = 1). gap_space="residual" carries it to the next predicted step; with
    none left (step 9 is computed and the last), the last step takes it: the latents agree through step 8."""
    from tcpade_fx.testing_pipelines import tiny_flux_pipeline

    pipe, kwargs = tiny_flux_pipeline()
    mask = "CCCCCCC.CC"
    latents = {}
    for k in (0.0, 0.5, 1.0):
        tcpade_fx.compile(pipe, policy=Policy(schedule="explicit", mask=mask, gap_correction=k, gap_span_limit=math.inf,
                                              gap_space=space))
        latents[k] = _latents_per_step(pipe, kwargs, len(mask))
        assert pipe.tcpade.stats.decisions(0) == mask
        assert [r.step for r in pipe.tcpade.stats.records if r.gap_corrected] == ([8] if k else [])
    moved = 8 if space == "sample" else 9
    for k in (0.5, 1.0):
        assert all(torch.equal(a, b) for a, b in zip(latents[k][:moved], latents[0.0][:moved]))
        assert bool(torch.isfinite(latents[k][-1]).all()) and not torch.equal(latents[k][moved], latents[0.0][moved])
    if space == "sample":
        full, half = (latents[k][8] - latents[0.0][8] for k in (1.0, 0.5))
        ulps = 4 * torch.finfo(torch.float32).eps * float(latents[0.0][8].abs().max())  # differences of latents
        assert float(full.abs().max()) > 100 * ulps
        torch.testing.assert_close(full, 2 * half, rtol=0, atol=ulps)


def test_an_input_written_in_place_before_the_gap_ends_skips_its_correction_and_says_so():
    """gap_space="sample" runs the gap's calls again at the computed step that ends it, on the inputs they were
    called with (kept, not copied): a pipeline whose scheduler writes the latents in place has changed them by then.
    That gap is left uncorrected with a note, not corrected from the wrong inputs; "residual" keeps no inputs."""
    from tcpade_fx.testing_pipelines import tiny_flux_pipeline

    pipe, kwargs = tiny_flux_pipeline()
    step = pipe.scheduler.step

    def step_in_place(model_output, timestep, sample, *args, **kw):
        result = step(model_output, timestep, sample, *args, **kw)
        sample.copy_(result[0])
        return (sample,)

    pipe.scheduler.step = step_in_place
    mask = "CCCCCCC.CC"
    outs = {}
    for k, space in ((0.0, "sample"), (1.0, "sample"), (1.0, "residual")):
        tcpade_fx.compile(pipe, policy=Policy(schedule="explicit", mask=mask, gap_correction=k, gap_span_limit=math.inf,
                                              gap_space=space))
        outs[k, space] = _run(pipe, kwargs, len(mask))
        notes = pipe.tcpade.stats.notes
        skipped = any("modified in place before the gap ended" in n for n in notes)
        assert skipped == (k == 1.0 and space == "sample")
    assert torch.equal(outs[1.0, "sample"], outs[0.0, "sample"])
    assert not torch.equal(outs[1.0, "residual"], outs[0.0, "sample"])


def test_with_the_input_gate_or_module_forecasts_it_is_not_applied_and_says_so():
    from tcpade_fx.testing_pipelines import tiny_wan_pipeline

    pipe, kwargs = tiny_wan_pipeline()
    gated = Policy.preset("balanced").replace(input_gate=True)
    tcpade_fx.compile(pipe, policy=gated)
    alone = _run(pipe, kwargs, 12)
    tcpade_fx.compile(pipe, policy=gated.replace(gap_correction=1.0))
    assert torch.equal(_run(pipe, kwargs, 12), alone)
    assert any("gap_correction is not applied: input_gate=True" in n for n in pipe.tcpade.stats.notes)
    modules = Policy.preset("balanced").replace(granularity="modules", method="taylor", modulate_denominator=False)
    tcpade_fx.compile(pipe, policy=modules)
    alone = _run(pipe, kwargs, 12)
    tcpade_fx.compile(pipe, policy=modules.replace(gap_correction=1.0))
    assert torch.equal(_run(pipe, kwargs, 12), alone)
    assert any("gap_correction is not applied: granularity='modules'" in n for n in pipe.tcpade.stats.notes)


def test_another_sampler_or_a_bare_transformer_gets_the_uncorrected_run_and_a_note():
    from diffusers import UniPCMultistepScheduler

    from tcpade_fx.testing import tiny_flux
    from tcpade_fx.testing_pipelines import tiny_flux_pipeline

    pipe, kwargs = tiny_flux_pipeline()
    pipe.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True)
    tcpade_fx.compile(pipe, policy=Policy.preset("balanced").replace(gap_correction=0.0))
    plain = _run(pipe, kwargs, 12)
    tcpade_fx.compile(pipe, policy=Policy.preset("balanced").replace(gap_correction=1.0))
    assert torch.equal(_run(pipe, kwargs, 12), plain)
    notes = pipe.tcpade.stats.notes
    assert any("gap_correction is not applied" in n and "UniPCMultistepScheduler" in n for n in notes)

    model, kw = tiny_flux(batch=1, image_tokens=16, text_tokens=8)
    tcpade_fx.compile(model, policy=Policy.preset("balanced").replace(gap_correction=1.0))
    with torch.no_grad():
        for t in torch.linspace(1.0, 0.05, 12):
            model(**dict(kw, timestep=t.reshape(1)))
    stats = model.tcpade.stats
    assert "." in stats.decisions(0) and not any(r.gap_corrected for r in stats.records)
    assert any("bare transformer call" in n for n in stats.notes)


@pytest.mark.slow
def test_on_a_trained_model_at_fifty_steps_the_correction_is_closer_to_the_full_run():
    """mnist-flux, 50 steps, "balanced", 8 samples of seeds no study chose with (7100..7107): with the correction the
    samples are closer to the full run (bench/ADAPTIVE_STUDY.md section 12 measured +5.8 dB on 16 other seeds)."""
    from tcpade_fx import metrics, models

    seeds = list(range(7100, 7108))
    labels, latents = [s % 10 for s in seeds], metrics.seeded_latents(seeds)

    def images(pipe):
        with torch.no_grad():
            return pipe(labels, latents=latents, num_inference_steps=50, guidance_scale=1.5, output_type="pt").images

    full = images(models.load("mnist-flux"))
    pipes = {k: models.load("mnist-flux") for k in (0.0, 1.0)}
    got = {}
    for k, pipe in pipes.items():
        tcpade_fx.compile(pipe, policy=Policy.preset("balanced").replace(gap_correction=k))
        got[k] = float(metrics.psnr(full, images(pipe)))
    assert pipes[1.0].tcpade.stats.compute_fraction < 0.45
    assert got[1.0] > got[0.0] + 1.0, got
