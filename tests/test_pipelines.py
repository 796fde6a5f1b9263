"""End-to-end tests on real diffusers pipelines built offline from tiny configs (random weights, prompt embeddings).

DiT, SD3 and PixArt-Σ guide with a doubled batch (one transformer call per step); Wan and Flux with
``true_cfg_scale > 1`` call the transformer twice per step (cond, then uncond), which needs one history per branch.
"""

from __future__ import annotations

import functools

import pytest
import torch

import tcpade_fx
from tcpade_fx import Policy
from tcpade_fx.runtime import TCPadeRuntime
from tcpade_fx.testing_pipelines import (
    tiny_dit_pipeline,
    tiny_flux_pipeline,
    tiny_pixart_pipeline,
    tiny_sd3_pipeline,
    tiny_wan_pipeline,
    output_of,
)

pytest.importorskip("transformers", reason="diffusers imports transformers for the Flux/Wan/SD3/PixArt pipelines")

STEPS = 20
BUILDERS = {
    "dit": tiny_dit_pipeline,
    "flux": tiny_flux_pipeline,
    "flux_true_cfg": functools.partial(tiny_flux_pipeline, true_cfg_scale=3.0),
    "wan": tiny_wan_pipeline,
    "sd3": tiny_sd3_pipeline,
    "pixart": tiny_pixart_pipeline,
}
#: transformer calls per step: separate-call CFG (cond + uncond) or one (batched CFG / no CFG)
BRANCHES = {"dit": 1, "flux": 1, "flux_true_cfg": 2, "wan": 2, "sd3": 1, "pixart": 1}
FAMILIES = list(BUILDERS)


def other_notes(stats) -> list[str]:
    """The notes besides the one saying that "balanced"'s gap correction does not apply to a non-Euler sampler."""
    return [n for n in stats.notes if not n.startswith("Policy.gap_correction is not applied")]


def run(pipe, kwargs, steps=STEPS, seed=0) -> torch.Tensor:
    return output_of(pipe(**kwargs, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed)))


class Built:
    """A pipeline, its call arguments, its untouched output and the kwargs of the transformer's first call."""

    def __init__(self, family: str):
        self.pipe, self.kwargs = BUILDERS[family]()
        self.cls = type(self.pipe)
        calls = []
        handle = self.pipe.transformer.register_forward_pre_hook(
            lambda m, args, kw: calls.append({"hidden_states": args[0], **kw} if args else dict(kw)) if not calls
            else None,
            with_kwargs=True,
        )
        self.reference = run(self.pipe, self.kwargs)
        handle.remove()
        self.first_call = calls[0]


_BUILT: dict[str, Built] = {}


@pytest.fixture(params=FAMILIES)
def built(request) -> Built:
    family = request.param
    if family not in _BUILT:
        _BUILT[family] = Built(family)
    b = _BUILT[family]
    b.family = family
    yield b
    tcpade_fx.disable(b.pipe)  # each test leaves the shared pipeline untouched
    assert type(b.pipe) is b.cls


def test_full_policy_is_identical_to_the_untouched_pipeline(built):
    pipe = tcpade_fx.compile(built.pipe, policy=Policy.preset("full"))
    assert pipe is built.pipe
    out = run(pipe, built.kwargs)
    assert torch.equal(out, built.reference)
    stats = pipe.tcpade.stats
    assert stats.compute_fraction == 1.0
    assert len(stats.records) == STEPS * BRANCHES[built.family]
    assert stats.num_steps == STEPS and stats.captures == 1 and other_notes(stats) == []


def test_balanced_computes_under_half_and_disable_restores(built):
    pipe = tcpade_fx.compile(built.pipe, policy="balanced")
    out = run(pipe, built.kwargs)
    assert out.shape == built.reference.shape and torch.isfinite(out).all()
    assert not torch.equal(out, built.reference)  # something was predicted
    stats = pipe.tcpade.stats
    assert stats.compute_fraction < 0.5, stats.summary()
    assert stats.predicted > 0 and other_notes(stats) == []
    assert "TC-Padé" in str(stats)
    # the first and last steps are computed on every branch
    for branch in range(BRANCHES[built.family]):
        schedule = stats.decisions(branch)
        assert len(schedule) == STEPS and schedule[0] == schedule[-1] == "C", schedule
    # a second call starts a fresh trajectory (the pipeline announces it) and gives the same result
    assert torch.equal(run(pipe, built.kwargs), out)
    tcpade_fx.disable(pipe)
    assert "forward" not in pipe.transformer.__dict__
    assert not hasattr(pipe, "tcpade") and not hasattr(pipe.transformer, "tcpade")
    assert type(pipe) is built.cls
    assert torch.equal(run(pipe, built.kwargs), built.reference)


def _hand_loop(transformer, first_call: dict, steps: int = STEPS) -> list[torch.Tensor]:
    """A sampler written by hand: Euler steps on the transformer's output at decreasing model times."""
    kwargs = dict(first_call)
    x = kwargs.pop("hidden_states")
    t0 = float(kwargs.pop("timestep").reshape(-1)[0])
    batch = x.shape[0]
    outs = []
    for i in range(steps):
        t = torch.full((batch,), t0 * (1 - i / steps))
        out = transformer(hidden_states=x, timestep=t, **kwargs)
        out = out[0] if isinstance(out, tuple) else out.sample
        outs.append(out)
        x = x - out[:, : x.shape[1]] / steps
    return outs


@pytest.mark.parametrize("built", ["dit", "flux", "wan"], indirect=True)
def test_transformer_level_compile_in_a_hand_written_loop(built):
    transformer = built.pipe.transformer
    with torch.no_grad():
        reference = _hand_loop(transformer, built.first_call)

    tcpade_fx.compile(transformer, policy="full")
    with torch.no_grad():
        full = _hand_loop(transformer, built.first_call)
    assert all(torch.equal(a, b) for a, b in zip(full, reference))

    tcpade_fx.compile(transformer, policy="balanced")  # re-compiling replaces the runtime
    runtime = transformer.tcpade
    loops = []
    for announce in (False, False, True):
        if announce:
            runtime.begin(STEPS)  # exact stage boundaries; otherwise progress is read from the times
        with torch.no_grad():
            loops.append(_hand_loop(transformer, built.first_call))
        assert all(torch.isfinite(o).all() for o in loops[-1])
        records = runtime.stats.records[-STEPS:]
        assert [r.step for r in records] == list(range(STEPS)) and {r.branch for r in records} == {0}
        fraction = sum(r.computed for r in records) / STEPS
        assert fraction < (0.5 if announce else 0.6), runtime.stats.decisions()
        if not announce and len(loops) == 2:
            # the second loop started above the time the first ended: noted, histories reset, same result
            assert any("timestep went up" in n for n in runtime.stats.notes), runtime.stats.notes
            assert all(torch.equal(a, b) for a, b in zip(loops[0], loops[1]))
    assert runtime.stats.captures == 0  # begin() starts new stats; the graphs were captured once, before
    tcpade_fx.disable(transformer)
    assert "forward" not in transformer.__dict__ and not hasattr(transformer, "tcpade")
    with torch.no_grad():
        again = _hand_loop(transformer, built.first_call)
    assert all(torch.equal(a, b) for a, b in zip(again, reference))


@pytest.mark.parametrize("built", ["wan", "flux_true_cfg"], indirect=True)
def test_separate_call_cfg_keeps_one_history_per_branch(built, monkeypatch):
    pipe = tcpade_fx.compile(built.pipe, policy="balanced")
    histories = {}

    def at_the_last_step(pipeline, i, t, callback_kwargs):  # histories are freed when the pipeline call ends
        if i == STEPS - 1:
            histories.update({b.index: [r.clone() for r in b.residuals] for b in pipeline.tcpade.branches.values()})
        return callback_kwargs

    out = run(pipe, {**built.kwargs, "callback_on_step_end": at_the_last_step})
    runtime: TCPadeRuntime = pipe.tcpade
    stats = runtime.stats
    by_branch = {b: [r for r in stats.records if r.branch == b] for b in (0, 1)}
    assert {r.branch for r in stats.records} == {0, 1}
    for records in by_branch.values():
        assert [r.step for r in records] == list(range(STEPS))
    # the two calls of a step share its time; each branch keeps its own residuals
    assert [r.time for r in by_branch[0]] == [r.time for r in by_branch[1]]
    assert set(histories) == {0, 1}
    h0, h1 = histories[0], histories[1]
    # the pipeline names its branches with cache_context: the records carry the names, in call order
    assert [r.context for r in stats.records[:2]] == ["cond", "uncond"]
    assert stats.decisions("cond") == stats.decisions(0) and stats.decisions("uncond") == stats.decisions(1)
    assert runtime.branches == {}  # freed at the end of the call (diffusers resets stateful hooks)
    assert h0 and h1 and not torch.equal(h0[-1], h1[-1])
    separate_errors = stats.check_errors()

    # the same run with one history shared by both branches (what a per-module cache does) predicts worse
    original_advance = TCPadeRuntime._advance

    def shared_advance(self, time, context):
        branch = original_advance(self, time, context)
        return self._branches.setdefault("shared", branch)

    monkeypatch.setattr(TCPadeRuntime, "_advance", shared_advance)
    shared = run(pipe, built.kwargs)
    shared_errors = pipe.tcpade.stats.check_errors()
    assert not torch.equal(shared, out)

    def error(x):
        return float((x - built.reference).norm() / built.reference.norm())

    assert error(out) < error(shared)
    assert sorted(shared_errors)[len(shared_errors) // 2] > sorted(separate_errors)[len(separate_errors) // 2]


@pytest.mark.parametrize("built", ["dit", "sd3", "pixart"], indirect=True)
def test_batched_cfg_is_one_branch_over_the_doubled_batch(built):
    pipe = tcpade_fx.compile(built.pipe, policy="balanced")
    run(pipe, built.kwargs)
    stats = pipe.tcpade.stats
    assert {r.branch for r in stats.records} == {0} and len(stats.records) == STEPS
    prompts = 2 if built.family == "dit" else 1  # DiT samples the two class labels, the others one prompt
    assert built.first_call["hidden_states"].shape[0] == 2 * prompts
    assert pipe.tcpade.branches[0].residuals[-1].shape[0] == 2 * prompts


def test_img2img_starts_part_way_and_still_computes_the_last_step():
    # strength < 1: the pipeline runs the schedule's last steps only, from the scheduler's begin index
    from diffusers import FluxImg2ImgPipeline

    pipe, kwargs = tiny_flux_pipeline()
    img2img = FluxImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    tcpade_fx.compile(img2img, "fast")
    image = torch.rand(1, 3, kwargs["height"], kwargs["width"], generator=torch.Generator().manual_seed(0))
    img2img(image=image, strength=0.6, num_inference_steps=STEPS, **kwargs)
    stats = img2img.tcpade.stats
    start = STEPS - int(STEPS * 0.6)
    assert [r.step for r in stats.records] == list(range(start, STEPS))
    assert stats.records[-1].computed and stats.records[-1].reason == "last step"
    # the budget is the preset's share of the steps actually run, not of all N
    assert stats.computed == -(-len(stats.records) * 28 // 100)  # ceil(0.28 · calls)
    assert stats.predicted > 0


def _second_order_schedulers() -> list[str]:
    """Every diffusers scheduler that declares order > 1 (no list of names: what the classes say)."""
    import diffusers

    names = []
    for name in dir(diffusers):
        if not name.endswith("Scheduler"):
            continue
        try:
            cls = getattr(diffusers, name)
            order = getattr(cls, "order", 1)
        except ImportError:  # a placeholder for a scheduler that needs an optional dependency (torchsde)
            continue
        if isinstance(cls, type) and isinstance(order, int) and order > 1:
            names.append(name)
    return sorted(names)


# FlowMatch Heun needs a flow pipeline; DPM-SDE needs torchsde; KarrasVe's step takes another signature (UNet
# pipelines only): none of them can sample the DiT pipeline, compiled or not
SECOND_ORDER = [n for n in _second_order_schedulers() if not any(k in n for k in ("FlowMatch", "SDE", "KarrasVe"))]


def test_the_second_order_list_is_what_diffusers_declares():
    assert {"HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"} <= set(SECOND_ORDER)


@pytest.mark.parametrize("scheduler", SECOND_ORDER)
def test_a_second_order_sampler_is_refused_with_what_to_use_instead(scheduler):
    import diffusers

    pipe, kwargs = tiny_dit_pipeline()
    euler = pipe.scheduler
    pipe.scheduler = getattr(diffusers, scheduler).from_config(euler.config)
    tcpade_fx.compile(pipe, "balanced")
    with pytest.raises(ValueError, match=f"{scheduler} (declares order 2|repeats its timesteps).*"
                                         "UniPCMultistepScheduler"):
        run(pipe, kwargs, steps=6)
    tcpade_fx.disable(pipe)
    assert torch.isfinite(run(pipe, kwargs, steps=6)).all()  # nothing lost: the pipeline still samples
    pipe.scheduler = euler
    tcpade_fx.compile(pipe, "balanced")
    run(pipe, kwargs, steps=6)
    assert [r.step for r in pipe.tcpade.stats.records] == list(range(6))


def test_a_stochastic_sampler_runs_with_a_note():
    from diffusers import EulerAncestralDiscreteScheduler

    pipe, kwargs = tiny_dit_pipeline()
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    tcpade_fx.compile(pipe, "balanced")
    out = run(pipe, kwargs, steps=12)
    stats = pipe.tcpade.stats
    assert torch.isfinite(out).all() and stats.predicted > 0
    assert any(n.startswith("stochastic sampler (EulerAncestralDiscreteScheduler") for n in stats.notes), stats.notes
