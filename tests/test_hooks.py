"""tcpade_fx as a diffusers hook, composed with what other libraries install on the same transformer:
accelerate's model CPU offload (either order, over several calls), offloading it cannot follow (refused),
other diffusers hooks, and the pipeline's cache_context branch names."""

from __future__ import annotations

import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook

import tcpade_fx
from tcpade_fx.integration import HOOK_NAME, UnsupportedHookError
from tcpade_fx.testing import tiny_flux
from tcpade_fx.testing_pipelines import output_of, tiny_flux_pipeline

pytest.importorskip("transformers")

STEPS = 10


def run(pipe, kwargs) -> torch.Tensor:
    return output_of(pipe(**kwargs, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0)))


@pytest.fixture(scope="module")
def flux():
    pipe, kwargs = tiny_flux_pipeline()
    return pipe, kwargs, run(pipe, kwargs)


def _fresh(flux):
    pipe, kwargs, reference = flux
    tcpade_fx.disable(pipe)
    pipe.remove_all_hooks()
    return pipe, kwargs, reference


@pytest.mark.parametrize("order", ["offload, then compile", "compile, then offload"])
def test_model_cpu_offload_caches_every_call_in_either_order(flux, order):
    pipe, kwargs, reference = _fresh(flux)
    if order.startswith("offload"):
        pipe.enable_model_cpu_offload(device="cpu")
        tcpade_fx.compile(pipe, "balanced")
    else:
        tcpade_fx.compile(pipe, "balanced")
        pipe.enable_model_cpu_offload(device="cpu")
    outs, predicted = [], []
    for _ in range(3):
        outs.append(run(pipe, kwargs))
        stats = pipe.tcpade.stats
        predicted.append(stats.predicted)
        assert len(stats.records) == STEPS, stats.summary()  # no phantom branches piling up
        assert stats.notes == []
    assert all(p > 0 for p in predicted), predicted  # was 6, 0, 0: accelerate dropped the runtime after a call
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert hasattr(pipe.transformer, "_hf_hook")  # accelerate's hook is still there, on top of ours
    # "full" equals the offloaded original, bit for bit
    tcpade_fx.compile(pipe, "full")
    assert torch.equal(run(pipe, kwargs), reference)
    assert torch.equal(run(pipe, kwargs), reference)


def test_disable_under_offload_leaves_nothing_that_comes_back(flux):
    pipe, kwargs, reference = _fresh(flux)
    tcpade_fx.compile(pipe, "balanced")
    pipe.enable_model_cpu_offload(device="cpu")
    run(pipe, kwargs)
    runtime = pipe.transformer.tcpade
    tcpade_fx.disable(pipe)
    calls_before = len(runtime.stats.records)
    for _ in range(3):
        assert torch.equal(run(pipe, kwargs), reference)
    assert len(runtime.stats.records) == calls_before  # the runtime never ran again
    assert HOOK_NAME not in pipe.transformer._diffusers_hook.hooks
    assert not hasattr(pipe, "tcpade") and not hasattr(pipe.transformer, "tcpade")
    assert hasattr(pipe.transformer, "_hf_hook")  # offloading itself stays enabled


def test_sequential_offload_is_refused_with_what_to_use_instead(flux):
    pipe, kwargs, _ = _fresh(flux)
    pipe.enable_sequential_cpu_offload(device="cpu")
    try:
        with pytest.raises(UnsupportedHookError, match="sequential CPU offload.*enable_model_cpu_offload"):
            tcpade_fx.compile(pipe, "balanced")
        assert not hasattr(pipe, "tcpade")
    finally:
        pipe.remove_all_hooks()


def test_group_offload_and_layerwise_casting_are_refused_before_or_after_compile():
    pipe, kwargs = tiny_flux_pipeline()
    transformer = pipe.transformer
    transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                     offload_type="block_level", num_blocks_per_group=1)
    with pytest.raises(UnsupportedHookError, match="group offload.*enable_model_cpu_offload"):
        tcpade_fx.compile(pipe, "balanced")
    assert not hasattr(pipe, "tcpade")

    pipe, kwargs = tiny_flux_pipeline()
    tcpade_fx.compile(pipe, "balanced")
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    with pytest.raises(UnsupportedHookError, match="layerwise casting"):
        run(pipe, kwargs)  # enabled after compile: refused at the next call, not run on stale weights


class _AddToInput(ModelHook):
    def pre_forward(self, module, *args, **kwargs):
        kwargs["hidden_states"] = kwargs["hidden_states"] + 0.5
        return args, kwargs


class _ScaleOutput(ModelHook):
    def post_forward(self, module, output):
        return (output[0] * 2.0, *output[1:]) if isinstance(output, tuple) else output


def test_other_diffusers_hooks_compose_in_either_order():
    module, kwargs = tiny_flux()
    with torch.no_grad():
        plain = module(**kwargs)[0]
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(_AddToInput(), "user_input_hook")  # before compile: captured as the model runs it
    with torch.no_grad():
        shifted = module(**kwargs)[0]
    assert not torch.equal(shifted, plain)
    tcpade_fx.compile(module, "full")
    with torch.no_grad():
        assert torch.equal(module(**kwargs)[0], shifted)
    registry.register_hook(_ScaleOutput(), "user_output_hook")  # after compile: wraps the runtime
    with torch.no_grad():
        assert torch.equal(module(**kwargs)[0], 2.0 * shifted)
    tcpade_fx.disable(module)  # removes only ours
    assert list(registry.hooks) == ["user_input_hook", "user_output_hook"]
    with torch.no_grad():
        assert torch.equal(module(**kwargs)[0], 2.0 * shifted)


def test_a_scheduler_step_patched_on_the_instance_still_runs_under_a_compiled_call(flux):
    """A user's (or another library's) ``scheduler.step`` set on the instance is what the call runs, with our step
    bookkeeping around it, and it is back in place after the call; a second compiled call does not stack ours."""
    pipe, kwargs, reference = _fresh(flux)
    original = pipe.scheduler.step
    seen = []

    def counted(*a, **k):
        seen.append(1)
        return original(*a, **k)

    pipe.scheduler.step = counted
    try:
        tcpade_fx.compile(pipe, "balanced")
        for call in (1, 2):
            out = run(pipe, kwargs)
            assert len(seen) == call * STEPS
            assert pipe.scheduler.step is counted
            assert pipe.tcpade.stats.num_steps == STEPS and pipe.tcpade.stats.predicted > 0
            assert bool(torch.isfinite(out).all())
    finally:
        del pipe.scheduler.step


def _guided_loop(module, kwargs, order: tuple[str, str], steps: int = 10) -> dict[str, list[torch.Tensor]]:
    """Two named branches per step (their inputs differ), called in ``order`` under cache_context."""
    x = kwargs["hidden_states"]
    rest = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "timestep")}
    inputs = {"cond": x, "uncond": x.flip(1)}
    outs: dict[str, list[torch.Tensor]] = {"cond": [], "uncond": []}
    module.tcpade.begin(steps)
    for i in range(steps):
        t = torch.full((x.shape[0],), 1.0 - i / steps)
        for name in order:
            with torch.no_grad(), module.cache_context(name):
                outs[name].append(module(hidden_states=inputs[name], timestep=t, **rest)[0])
    return outs


def test_cache_context_names_key_the_branch_histories():
    module, kwargs = tiny_flux()
    tcpade_fx.compile(module, "balanced")
    forward = _guided_loop(module, kwargs, ("cond", "uncond"))
    stats = module.tcpade.stats
    assert stats.predicted > 0
    assert {r.context for r in stats.records} == {"cond", "uncond"}
    # the same branches called in the other order: each name keeps its own history, so nothing changes
    backward = _guided_loop(module, kwargs, ("uncond", "cond"))
    for name in ("cond", "uncond"):
        assert all(torch.equal(a, b) for a, b in zip(forward[name], backward[name])), name
    assert module.tcpade.stats.decisions("cond") == stats.decisions("cond")


@pytest.mark.parametrize("family", ["dit", "flux"])
def test_first_call_does_two_forwards_of_model_work(family):
    from tcpade_fx.testing import TINY_TRANSFORMERS, AttentionCounter

    module, kwargs = TINY_TRANSFORMERS[family]()
    with torch.no_grad(), AttentionCounter() as plain:
        reference = module(**kwargs)[0]
    tcpade_fx.compile(module, "balanced")
    with torch.no_grad(), AttentionCounter() as first:
        out = module(**kwargs)[0]
    with torch.no_grad(), AttentionCounter() as second:
        module(**kwargs)
    assert plain.calls > 0
    # one reference run of the original and the verified compute graph, whose output serves the call
    assert first.calls <= 2.5 * plain.calls and second.calls == plain.calls
    assert torch.equal(out, reference)


def test_a_compiled_pipeline_refuses_pickle_and_deepcopy_with_what_to_do():
    import copy
    import pickle

    pipe, kwargs = tiny_flux_pipeline()
    tcpade_fx.compile(pipe, "balanced")
    run(pipe, kwargs)
    for attempt in (lambda: pickle.dumps(pipe), lambda: copy.deepcopy(pipe), lambda: pickle.dumps(pipe.transformer),
                    lambda: copy.deepcopy(pipe.transformer)):
        with pytest.raises(TypeError, match="cannot be pickled or deep-copied.*tcpade_fx.disable"):
            attempt()
    tcpade_fx.disable(pipe)
    clone = copy.deepcopy(pipe)  # disabled: copies, and the copy compiles and samples
    pickle.loads(pickle.dumps(pipe.transformer))
    tcpade_fx.compile(clone, "balanced")
    assert torch.isfinite(run(clone, kwargs)).all() and clone.tcpade.stats.predicted > 0
