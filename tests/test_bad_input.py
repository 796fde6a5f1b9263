"""Bad input: clear errors for wrong arguments and models, and no mixed histories or silent NaN predictions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tcpade_fx
from tcpade_fx import Policy
from tcpade_fx.passes import UnsupportedModelError
from tcpade_fx.policy import PRESETS
from tcpade_fx.backends import registered_backends
from tcpade_fx.testing import tiny_dit, tiny_flux

STEPS = 20


def times(t0: float = 1000.0, steps: int = STEPS) -> list[float]:
    return [t0 * (1 - i / steps) for i in range(steps)]


def call(module, kwargs, t: float, **changes):
    kw = {**kwargs, **changes}
    batch = kw["hidden_states"].shape[0]
    with torch.no_grad():
        return module(**{**kw, "timestep": torch.full((batch,), t)})[0]


# -- arguments ----------------------------------------------------------------------------------------------------
def test_unknown_policy_lists_the_presets():
    module, _ = tiny_dit()
    with pytest.raises(ValueError) as info:
        tcpade_fx.compile(module, policy="turbo")
    msg = str(info.value)
    assert "'turbo'" in msg
    for name in PRESETS:
        assert repr(name) in msg
    with pytest.raises(TypeError, match="preset name"):
        tcpade_fx.compile(module, policy=0.4)
    assert not hasattr(module, "tcpade") and "forward" not in module.__dict__


def test_unknown_backend_lists_the_backends():
    module, _ = tiny_dit()
    with pytest.raises(ValueError) as info:
        tcpade_fx.compile(module, backend="tvm")
    msg = str(info.value)
    assert "'tvm'" in msg and all(repr(b) in msg for b in ("eager", "inductor", "tensorrt"))
    assert set(registered_backends()) >= {"eager", "inductor", "tensorrt", "onnxruntime"}
    assert not hasattr(module, "tcpade")


def test_invalid_policy_fields_are_named():
    with pytest.raises(ValueError, match="mid_max_skip"):
        Policy(mid_max_skip=-1)


def test_a_target_without_a_transformer_is_refused():
    class UNetPipelineLike:
        unet = nn.Linear(2, 2)

    with pytest.raises(TypeError, match="transformer"):
        tcpade_fx.compile(UNetPipelineLike())


# -- models -------------------------------------------------------------------------------------------------------
class SequentialMLP(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 16), nn.SiLU(), nn.Linear(16, dim))

    def forward(self, hidden_states, timestep):
        return self.net(hidden_states + timestep[:, None])


def test_unsupported_model_names_what_was_looked_for():
    module = SequentialMLP().eval()
    tcpade_fx.compile(module)  # capture happens at the first call, with the user's shapes
    with pytest.raises(UnsupportedModelError) as info:
        module(hidden_states=torch.randn(2, 8), timestep=torch.ones(2))
    msg = str(info.value)
    assert "transformer_blocks" in msg and "blocks" in msg and "block_prefixes" in msg
    tcpade_fx.disable(module)
    assert module(hidden_states=torch.randn(2, 8), timestep=torch.ones(2)).shape == (2, 8)


def test_a_call_without_timestep_is_explained():
    module = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    tcpade_fx.compile(module)
    with pytest.raises(TypeError, match="timestep"):
        module(torch.randn(2, 8))


@pytest.mark.parametrize("how", ["enable_cache", "apply_first_block_cache", "taylorseer"])
def test_an_enabled_diffusers_cache_is_refused_with_an_explanation(how):
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig
    from diffusers.hooks import apply_first_block_cache

    module, kwargs = tiny_flux()
    if how == "enable_cache":
        module.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    elif how == "apply_first_block_cache":
        apply_first_block_cache(module, FirstBlockCacheConfig(threshold=0.2))
    else:
        module.enable_cache(TaylorSeerCacheConfig())
    with pytest.raises(RuntimeError) as info:
        tcpade_fx.compile(module)
    msg = str(info.value)
    assert "cache is already enabled" in msg and "disable" in msg
    assert "fbc" in msg or "enable_cache" in msg
    assert not hasattr(module, "tcpade") and "forward" not in module.__dict__
    if how != "apply_first_block_cache":  # enable_cache has its inverse; then compiling works
        module.disable_cache()
        tcpade_fx.compile(module)
        assert call(module, kwargs, 0.5).shape == kwargs["hidden_states"].shape


# -- runtime ------------------------------------------------------------------------------------------------------
def test_a_shape_change_mid_run_recaptures_and_never_mixes_histories():
    module, kwargs = tiny_dit(batch=2)
    small = dict(hidden_states=kwargs["hidden_states"][:1], class_labels=kwargs["class_labels"][:1])
    ts = times()
    tcpade_fx.compile(module, "balanced")
    runtime = module.tcpade
    runtime.begin(STEPS)
    for t in ts[:10]:
        call(module, kwargs, t)
    after = [call(module, kwargs, t, **small) for t in ts[10:]]
    stats = runtime.stats
    assert any("input signature changed at call 10 (step 10, branch 0)" in n
               and "its history reset" in n for n in stats.notes), stats.notes
    assert stats.captures == 1  # the batch axis is dynamic: the same graphs run batch 1, checked once
    assert all(r.shape[0] == 1 for b in runtime.branches.values() for r in b.residuals)
    # the trajectory goes on: steps keep counting, the stages and the forced last step stay where they were
    assert [r.step for r in stats.records] == list(range(STEPS))
    assert stats.records[10].computed and stats.records[10].reason == "no history"
    assert stats.records[-1].computed
    assert any(not r.computed for r in stats.records[11:])
    assert all(torch.isfinite(o).all() and o.shape[0] == 1 for o in after)

    # going back to a shape seen before reuses its graphs (no new capture), again with a fresh history
    runtime.begin(STEPS)
    call(module, kwargs, ts[0])
    call(module, kwargs, ts[1], **small)
    assert runtime.stats.captures == 0, runtime.stats.notes
    assert "reused" in runtime.stats.notes[-1] and "its history reset" in runtime.stats.notes[-1]
    assert [r.step for r in runtime.stats.records] == [0, 1]


def test_cfg_branches_of_different_shapes_keep_their_own_histories():
    # true CFG whose negative prompt has another length: the two branches alternate signatures at every step
    module, kwargs = tiny_dit(batch=2)
    small = dict(hidden_states=kwargs["hidden_states"][:1], class_labels=kwargs["class_labels"][:1])
    tcpade_fx.compile(module, "balanced")
    runtime = module.tcpade
    runtime.begin(STEPS)
    for t in times():
        call(module, kwargs, t)
        call(module, kwargs, t, **small)
    stats = runtime.stats
    assert not any("input signature changed" in n for n in stats.notes), stats.notes
    assert stats.captures == 1 and runtime.graph_sets == 1  # one graph set with a dynamic batch runs both
    assert [b.residuals[-1].shape[0] for _, b in sorted(runtime.branches.items())] == [2, 1]
    for branch in (0, 1):
        records = [r for r in stats.records if r.branch == branch]
        assert [r.step for r in records] == list(range(STEPS))
        assert sum(not r.computed for r in records) >= STEPS // 3


def test_a_pipeline_called_at_another_size_recaptures():
    pytest.importorskip("transformers")
    from tcpade_fx.testing_pipelines import output_of, tiny_sd3_pipeline

    pipe, kwargs = tiny_sd3_pipeline()
    tcpade_fx.compile(pipe, "balanced")
    bigger = {**kwargs, "height": 32, "width": 32}

    def run(kw):
        return output_of(pipe(**kw, num_inference_steps=8, generator=torch.Generator().manual_seed(0)))

    run(kwargs)
    out = run(bigger)
    assert out.shape[-1] == 32 and pipe.tcpade.stats.captures == 1
    assert any("re-captured" in n for n in pipe.tcpade.stats.notes)
    tcpade_fx.compile(pipe, "balanced")
    assert torch.equal(run(bigger), out)


def test_timesteps_going_up_outside_a_pipeline_reset_and_say_so():
    module, kwargs = tiny_dit()
    tcpade_fx.compile(module, "balanced")
    first = [call(module, kwargs, t) for t in times()]
    second = [call(module, kwargs, t) for t in times()]
    notes = module.tcpade.stats.notes
    assert any(f"timestep went up (50 -> 1000) at call {STEPS}" in n and "histories reset" in n for n in notes), notes
    assert all(torch.equal(a, b) for a, b in zip(first, second))  # nothing leaked from the first trajectory
    assert module.tcpade.stats.predicted > 0


def test_a_nan_residual_clears_the_history_and_is_reported():
    module, kwargs = tiny_dit()
    ts = times()
    tcpade_fx.compile(module, "balanced")
    runtime = module.tcpade
    runtime.begin(STEPS)
    for t in ts:
        call(module, kwargs, t)
    schedule = runtime.stats.decisions()
    # a computed mid-run step followed by a predicted one: the NaN goes into a computed step's residual
    k = next(i for i in range(2, STEPS - 1) if schedule[i] == "C" and schedule[i + 1] == ".")

    runtime.begin(STEPS)
    nan = torch.full_like(kwargs["hidden_states"], float("nan"))
    outs = [call(module, kwargs, t, hidden_states=nan) if i == k else call(module, kwargs, t)
            for i, t in enumerate(ts)]
    stats = runtime.stats
    assert any(f"step {k}: block-stack residual not finite, history cleared" in n for n in stats.notes), stats.notes
    assert stats.records[k].computed
    assert stats.records[k + 1].computed and stats.records[k + 1].reason == "no history"
    assert not torch.isfinite(outs[k]).all()
    assert all(torch.isfinite(o).all() for i, o in enumerate(outs) if i != k)
    assert all(torch.isfinite(r).all() for b in runtime.branches.values() for r in b.residuals)
    # predictions resume once the history has refilled
    assert any(not r.computed for r in stats.records[k + 1:])


def test_a_non_finite_prediction_steps_with_the_newest_residual_and_is_reported(monkeypatch):
    """No host read of a prediction's finiteness (issue 15): a non-finite predicted residual is replaced on the
    device by the newest computed one, and the next read reports it."""
    module, kwargs = tiny_dit()
    ts = times()
    tcpade_fx.compile(module, "balanced")
    runtime = module.tcpade
    runtime.begin(STEPS)
    [call(module, kwargs, t) for t in ts]
    schedule = runtime.stats.decisions()
    k = schedule.index(".")
    time_k = runtime.stats.records[k].time
    real = tcpade_fx.runtime.extrapolate_stacked

    def replaced_at_step_k(fill):
        def extrapolate(times_, stacked, target, **kw):
            pred = real(times_, stacked, target, **kw)
            if target == time_k and kw.get("out") is not None:  # the prediction (the check passes no out)
                fill(pred, kw["like"])
            return pred
        return extrapolate

    runs = {}
    for name, fill in {"overflowing": lambda pred, like: pred.fill_(float("inf")),  # a float16 overflow's result
                       "reuse": lambda pred, like: pred.copy_(like)}.items():
        monkeypatch.setattr(tcpade_fx.runtime, "extrapolate_stacked", replaced_at_step_k(fill))
        runtime.begin(STEPS)
        runs[name] = ([call(module, kwargs, t) for t in ts], runtime.stats)
    outs, stats = runs["overflowing"]
    assert any(f"step {k}: predicted residual not finite in 2 batch row(s)" in n for n in stats.notes), stats.notes
    assert not stats.records[k].computed and "not finite" in stats.records[k].reason
    assert stats.decisions() == schedule
    assert all(torch.isfinite(o).all() for o in outs)
    # the step was taken with the newest computed residual: exactly what a reuse at step k gives
    assert all(torch.equal(a, b) for a, b in zip(outs, runs["reuse"][0]))
    assert not any("not finite" in n for n in runs["reuse"][1].notes)


def test_a_fallback_at_the_end_of_a_trajectory_is_noted_when_the_next_one_starts(monkeypatch):
    """What is pending on the device when a bare transformer's trajectory ends (its time going up) is read then,
    not dropped with the histories."""
    module, kwargs = tiny_dit()
    ts = times()
    tcpade_fx.compile(module, Policy(schedule="explicit", mask="CCC.C..C..C..C..C..."))  # ends predicted
    [call(module, kwargs, t) for t in ts]
    schedule = module.tcpade.stats.decisions()
    k = schedule.rindex(".")
    assert k == len(ts) - 1, schedule  # the last step predicted: no computed call reads after it
    time_k = module.tcpade.stats.records[k].time
    real = tcpade_fx.runtime.extrapolate_stacked

    def overflowing_at_k(times_, stacked, target, **kw):
        pred = real(times_, stacked, target, **kw)
        return pred.fill_(float("inf")) if target == time_k and kw.get("out") is not None else pred

    monkeypatch.setattr(tcpade_fx.runtime, "extrapolate_stacked", overflowing_at_k)
    [call(module, kwargs, t) for t in ts]  # a new trajectory (the time went up), whose step k falls back
    assert not any("not finite" in n for n in module.tcpade.current_stats.notes)  # still on the device
    call(module, kwargs, ts[0])  # the next trajectory starts: the pending fallback is read and noted
    notes = module.tcpade.current_stats.notes
    assert any(f"step {k}: predicted residual not finite in 2 batch row(s)" in n for n in notes), notes


def test_an_unannounced_trajectory_after_begin_forgets_the_announced_step_count():
    model, kw = tiny_dit()
    tcpade_fx.compile(model, policy="balanced")
    model.tcpade.begin(num_steps=12)
    for t in torch.linspace(999, 1, 12):
        model(**{**kw, "timestep": torch.full_like(kw["timestep"], float(t))})
    assert model.tcpade.branches[0].controller.num_steps == 12
    for t in torch.linspace(999, 1, 5):  # a new loop, no begin(): the 12 no longer applies
        model(**{**kw, "timestep": torch.full_like(kw["timestep"], float(t))})
    assert any("timestep went up" in n for n in model.tcpade.stats.notes)
    assert model.tcpade.branches[0].controller.num_steps is None
