"""Diffusers glue: finding the denoiser, installing the runtime as a diffusers hook, and driving it by the scheduler.

The runtime lives in the transformer's :class:`diffusers.hooks.HookRegistry` as the named hook ``"tcpade_fx"``
(:class:`TCPadeHook`), the way diffusers' own caches do:

* capture traces the forward *below* the hook (``fn_ref.original_forward``), i.e. the model as the hooks other
  libraries registered before ours present it (a context-parallel input split is captured, not dropped);
* accelerate's model CPU offload wraps the transformer's forward too, and re-installs its wrapper at the end of
  every pipeline call. Installing (and removing) our hook therefore takes accelerate's hook off, registers (or
  removes) ours, and puts accelerate's same hook object back on top: the order is the one a user gets by calling
  ``enable_model_cpu_offload()`` after ``tcpade_fx.compile``, whichever came first, and each call still moves the
  model where accelerate wants it before the runtime runs;
* sequential CPU offload, group offload and layerwise casting change the weights inside the forward and are
  refused at :func:`install_runtime`, with what to use instead;
* a pipeline that names its guidance branches with ``transformer.cache_context("cond"/"uncond")`` gets one history
  per name (the hook receives the context like diffusers' stateful hooks do).

For a pipeline, the scheduler drives the trajectory: for the duration of each pipeline call its ``set_timesteps``
starts a trajectory (:meth:`TCPadeRuntime.begin` with the scheduler's grid) and its ``step`` ends a step.
"""

from __future__ import annotations

import contextlib
import functools
import re
from typing import Any, Callable, TypeVar

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from .runtime import TCPadeRuntime

T = TypeVar("T")

HOOK_NAME = "tcpade_fx"
_CACHE_HOOK_MARKERS = ("cache", "pyramid", "broadcast", "taylorseer", "fbc_")  # fbc_: first-block cache
#: diffusers hooks that move or cast weights inside the forward: refused (see :func:`refuse_weight_hooks`)
_WEIGHT_HOOKS = {
    "group_offloading": "group offload (enable_group_offload)",
    "layerwise_casting": "layerwise casting (enable_layerwise_casting)",
}


class UnsupportedHookError(RuntimeError):
    """A hook on the transformer changes its weights inside the forward; tcpade_fx cannot compose with it."""


def transformer_of(target) -> torch.nn.Module:
    """The transformer a pipeline denoises with (``.transformer``), or ``target`` itself when it is a module."""
    if isinstance(target, torch.nn.Module):
        return target
    transformer = getattr(target, "transformer", None)
    if isinstance(transformer, torch.nn.Module):
        return transformer
    raise TypeError(
        f"tcpade_fx.compile expects a diffusers pipeline with a `.transformer` or a transformer nn.Module, got "
        f"{type(target).__name__}. UNet pipelines have no transformer-block stack to cache."
    )


def denoisers_of(target) -> dict[str, torch.nn.Module]:
    """Every transformer a pipeline denoises with, by component name (``transformer``, ``transformer_2``, ...:
    Wan 2.2's two experts); ``{"transformer": target}`` for a bare module."""
    if isinstance(target, torch.nn.Module):
        return {"transformer": target}
    found = {name: getattr(target, name, None) for name in ("transformer", *sorted(
        n for n in (getattr(target, "components", None) or {}) if re.fullmatch(r"transformer_\d+", n)))}
    found = {name: module for name, module in found.items() if isinstance(module, torch.nn.Module)}
    if not found:
        transformer_of(target)  # raises with what is expected
    return found


def _registries(module: torch.nn.Module):
    for name, sub in module.named_modules():
        registry = getattr(sub, "_diffusers_hook", None)
        if registry is not None:
            yield name, registry


def active_cache_hooks(module: torch.nn.Module) -> list[str]:
    """The diffusers caches enabled on ``module`` (their hook names and where they sit)."""
    found = []
    if getattr(module, "is_cache_enabled", False):
        found.append(f"{type(module).__name__}.enable_cache(...)")
    for name, registry in _registries(module):
        for hook_name in registry.hooks:
            if hook_name != HOOK_NAME and any(marker in hook_name.lower() for marker in _CACHE_HOOK_MARKERS):
                found.append(f"{hook_name!r} on {name or type(module).__name__}")
    return found


def refuse_weight_hooks(module: torch.nn.Module) -> None:
    """Raise :class:`UnsupportedHookError` for sequential CPU offload, group offload or layerwise casting."""
    meta = [n for n, p in module.named_parameters() if p.device.type == "meta"]
    accelerate_inside = [n for n, sub in module.named_modules() if n and getattr(sub, "_hf_hook", None) is not None]
    if accelerate_inside or meta:
        where = (accelerate_inside or meta)[0]
        raise UnsupportedHookError(
            f"{type(module).__name__} has accelerate hooks or meta-device weights inside it (at {where!r}): "
            "sequential CPU offload (enable_sequential_cpu_offload) or a device map moves each submodule's weights "
            "during the forward, which tcpade_fx's captured graphs cannot follow. Use pipe.enable_model_cpu_offload() "
            "instead (it composes with tcpade_fx, in either order), or load the transformer fully on one device."
        )
    for name, registry in _registries(module):
        for hook_name, what in _WEIGHT_HOOKS.items():
            if hook_name in registry.hooks:
                raise UnsupportedHookError(
                    f"{what} is enabled on {type(module).__name__} (hook {hook_name!r} on {name or 'the model'}): it "
                    "moves or casts weights inside the forward, which tcpade_fx's captured graphs cannot follow. "
                    "Use pipe.enable_model_cpu_offload() instead of group offload (it composes with tcpade_fx), "
                    "cast the model with .to(dtype) instead of layerwise casting, or remove the hook first "
                    f"(transformer._diffusers_hook.remove_hook({hook_name!r}))."
                )


class _ContextName(StateManager):
    """Receives the pipeline's ``cache_context`` like a diffusers stateful hook's state manager does."""

    def __init__(self):
        super().__init__(BaseState)
        self.name: str | None = None

    def set_context(self, context) -> None:  # diffusers >= 0.36 passes a CacheContext (or None)
        self.name = getattr(context, "name", context)

    _set_context = set_context  # older diffusers pass the name

    def reset(self, *args, **kwargs) -> None:
        self.name = None


_NO_COPY = (
    "a tcpade_fx-compiled {what} cannot be pickled or deep-copied: its captured graphs and histories are bound to "
    "this process's module objects. Call tcpade_fx.disable(pipe) first, pickle or copy it, and compile the copy "
    "(tcpade_fx.compile(copy, policy=...)); or save the weights with save_pretrained and export the graphs with "
    "tcpade_fx.export.to_onnx"
)


def _refuse_copy(what: str):
    def __reduce_ex__(self, protocol):
        raise TypeError(_NO_COPY.format(what=what))

    return __reduce_ex__


class TCPadeHook(ModelHook):
    """The runtime as a diffusers hook: replaces the forward of the module it is registered on."""

    _is_stateful = True
    __reduce_ex__ = _refuse_copy("transformer")

    def __init__(self, runtime: TCPadeRuntime):
        super().__init__()
        self.runtime = runtime
        self.context = _ContextName()

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        return self.runtime.call(args, kwargs, forward=self.fn_ref.original_forward, context=self.context.name)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        # diffusers resets stateful hooks at the end of every pipeline call: free the histories (each call
        # starts a new trajectory anyway); the graphs and stats stay
        self.runtime.reset()
        return module


@contextlib.contextmanager
def _accelerate_outside(module: torch.nn.Module):
    """Take accelerate's module-level hook off ``module`` for the block, then put the same hook back on top."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        yield
        return
    from accelerate.hooks import add_hook_to_module, remove_hook_from_module

    remove_hook_from_module(module)
    try:
        yield
    finally:
        add_hook_to_module(module, hook)


def _scheduler_method(scheduler: Any, name: str) -> Callable:
    """``scheduler.name`` as a call would find it, our own wrappers (from an enclosing compiled call) looked through."""
    method = scheduler.__dict__.get(name)
    while method is not None and getattr(method, "_tcpade_scheduler_wrapper", False):
        method = method.__wrapped__
    return method if method is not None else getattr(type(scheduler), name).__get__(scheduler)


def _time_grids(scheduler) -> list[list[float]]:
    """The scheduler's candidate time grids, one value per step: its sigmas (flow schedulers keep them exact,
    where their timesteps may be rounded) and its timesteps."""
    timesteps = scheduler.timesteps
    grids = []
    sigmas = getattr(scheduler, "sigmas", None)
    if isinstance(sigmas, torch.Tensor) and sigmas.numel() >= len(timesteps):
        grids.append(sigmas.reshape(-1)[: len(timesteps)].double().tolist())
    grids.append(timesteps.double().tolist())
    return grids


def euler_sigmas(scheduler) -> list[float] | None:
    """σ_0..σ_N of a sampler whose step is ``x + (σ_{k+1} − σ_k)·output`` (``Policy.gap_correction`` corrects such
    steps): diffusers' ``FlowMatchEulerDiscreteScheduler`` with decreasing sigmas and without stochastic sampling.
    None for any other scheduler (a multistep solver reuses its outputs in later steps, a stochastic one adds
    noise): the correction is then not applied, with a note."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = getattr(scheduler, "config", {}) or {}
    sigmas = getattr(scheduler, "sigmas", None)
    if (not isinstance(scheduler, FlowMatchEulerDiscreteScheduler) or config.get("stochastic_sampling")
            or config.get("invert_sigmas") or not isinstance(sigmas, torch.Tensor)
            or sigmas.numel() != len(scheduler.timesteps) + 1):
        return None
    values = sigmas.double().reshape(-1).tolist()
    if any(b > a for a, b in zip(values, values[1:])):
        return None
    return values


def _scheduler_step_index(scheduler) -> int | None:
    """The index of the step the scheduler is at (None where it does not say, e.g. before its first step)."""
    for name in ("step_index", "begin_index"):
        value = getattr(scheduler, name, None)
        if isinstance(value, (int, torch.Tensor)) and not isinstance(value, bool):
            return int(value)
    return None


def require_first_order(scheduler) -> None:
    """Refuse a sampler that evaluates the transformer more than once per step: one that declares ``order > 1``
    (diffusers' Heun, KDPM2, DPM-SDE, FlowMatchHeun, ...) or repeats its timesteps."""
    timesteps = scheduler.timesteps
    order = getattr(scheduler, "order", 1)
    repeated = len(timesteps) > 1 and bool((timesteps[1:] == timesteps[:-1]).any())
    if (isinstance(order, int) and order > 1) or repeated:
        why = f"declares order {order}" if isinstance(order, int) and order > 1 else "repeats its timesteps"
        raise ValueError(
            f"{type(scheduler).__name__} {why}: a second-order sampler that evaluates the transformer more than once "
            "per step; TC-Padé needs one evaluation per step to extrapolate along. Use a first-order scheduler "
            "(FlowMatchEulerDiscreteScheduler, EulerDiscreteScheduler) or a multistep solver "
            "(UniPCMultistepScheduler, DPMSolverMultistepScheduler), or tcpade_fx.disable(pipe) for this sampler."
        )


def stochastic_sampler(scheduler) -> str | None:
    """Why ``scheduler`` injects noise at each step (None when, as far as its config says, it does not)."""
    config = getattr(scheduler, "config", {}) or {}
    if "sde" in str(config.get("algorithm_type", "")).lower():
        return f"algorithm_type={config['algorithm_type']!r}"
    if config.get("stochastic_sampling"):
        return "stochastic_sampling=True"
    if float(config.get("s_churn", 0) or 0) > 0:
        return f"s_churn={config['s_churn']}"
    name = type(scheduler).__name__
    if any(k in name for k in ("Ancestral", "DDPM", "LCM", "TCD", "SDE")):
        return f"{name} adds fresh noise at every step"
    return None


def _pipeline_class_with_reset(cls: type) -> type:
    base_call = cls.__call__

    @functools.wraps(base_call)
    def __call__(self, *args, **kwargs):
        runtimes: list[TCPadeRuntime] = list(self.tcpade_denoisers.values())
        for runtime in runtimes:
            refuse_weight_hooks(runtime.module)  # enabled after compile: refused before it can run wrong
        scheduler = getattr(self, "scheduler", None)
        wrapped = ("set_timesteps", "step")
        originals = {n: scheduler.__dict__.get(n) for n in wrapped} if scheduler is not None else {}

        if scheduler is not None:
            # what the call would run without us: an instance-level override (a user's or another library's patch)
            # where there is one, not only the class's method; our own wrappers (a nested call) are looked through
            bound_set = _scheduler_method(scheduler, "set_timesteps")
            bound_step = _scheduler_method(scheduler, "step")

            # wraps: pipelines inspect set_timesteps' signature (retrieve_timesteps looks for `sigmas`/`timesteps`)
            @functools.wraps(bound_set)
            def set_timesteps(*a, **k):
                result = bound_set(*a, **k)
                require_first_order(scheduler)
                stochastic = stochastic_sampler(scheduler)
                for runtime in runtimes:
                    runtime.begin(num_steps=len(scheduler.timesteps), schedule=_time_grids(scheduler),
                                  step_index=lambda: _scheduler_step_index(scheduler),
                                  euler_sigmas=euler_sigmas(scheduler), sampler=type(scheduler).__name__)
                    if stochastic:
                        runtime.stats.notes.append(
                            f"stochastic sampler ({stochastic}): each step's fresh noise is not in the residual "
                            "history, so predictions deviate more from the full run than with a deterministic sampler")
                return result

            @functools.wraps(bound_step)
            def step(*a, **k):
                result = bound_step(*a, **k)
                for runtime in runtimes:
                    runtime.step_done()
                return result

            set_timesteps._tcpade_scheduler_wrapper = step._tcpade_scheduler_wrapper = True
            scheduler.set_timesteps = set_timesteps
            scheduler.step = step
        for runtime in runtimes:
            runtime.begin(None)
        try:
            return base_call(self, *args, **kwargs)
        finally:
            for name, original in originals.items():
                if original is None:
                    scheduler.__dict__.pop(name, None)
                else:
                    setattr(scheduler, name, original)

    return type(cls.__name__, (cls,), {"__call__": __call__, "_tcpade_base_class": cls,
                                       "__reduce_ex__": _refuse_copy("pipeline")})


def installed_runtime(target) -> TCPadeRuntime | None:
    """The runtime installed on ``target``'s transformer (None when there is none)."""
    return _hooked_runtime(transformer_of(target))


def _hooked_runtime(module: torch.nn.Module) -> TCPadeRuntime | None:
    registry = getattr(module, "_diffusers_hook", None)
    hook = registry.get_hook(HOOK_NAME) if registry is not None else None
    return hook.runtime if hook is not None else None


def install_runtimes(target: T, runtimes: dict[str, TCPadeRuntime]) -> T:
    """Register each runtime as the ``"tcpade_fx"`` hook of the denoiser of that name (replacing earlier ones)
    and, for a pipeline, let the scheduler drive their trajectories. Used by :func:`tcpade_fx.compile` (every
    denoiser of :func:`denoisers_of`) and the export runners (``transformer``).

    Raises :class:`UnsupportedHookError` for hooks it cannot compose with (see :func:`refuse_weight_hooks`).
    """
    denoisers = denoisers_of(target)
    unknown = sorted(set(runtimes) - set(denoisers))
    if unknown:
        raise ValueError(f"{type(target).__name__} has no denoiser named {unknown}; it has {sorted(denoisers)}")
    for name in runtimes:
        refuse_weight_hooks(denoisers[name])
    remove_runtime(target)
    for name, runtime in runtimes.items():
        module = denoisers[name]
        with _accelerate_outside(module):
            registry = HookRegistry.check_if_exists_or_initialize(module)
            registry.register_hook(TCPadeHook(runtime), HOOK_NAME)
        module.tcpade = runtime
    uncached = sorted(set(denoisers) - set(runtimes))
    install_note = " runs uncached (not part of this install)"
    for runtime in runtimes.values():  # this install's notes replace an earlier install's; the runtime's own stay
        runtime.standing_notes = [n for n in runtime.standing_notes if not n.endswith(install_note)]
        runtime.standing_notes += [f"{name}{install_note}" for name in uncached]
    if target is not denoisers.get("transformer"):
        target.tcpade = runtimes.get("transformer") or next(iter(runtimes.values()))
        target.tcpade_denoisers = dict(runtimes)
        cls = type(target)
        if not hasattr(cls, "_tcpade_base_class"):
            target.__class__ = _pipeline_class_with_reset(cls)
    return target


def install_runtime(target: T, runtime: TCPadeRuntime) -> T:
    """:func:`install_runtimes` for the ``transformer`` alone."""
    return install_runtimes(target, {"transformer": runtime})


def _drop_plain_forward(module: torch.nn.Module) -> None:
    """An emptied hook chain leaves the class's own forward bound on the instance: drop it (nothing to restore)."""
    forward = module.__dict__.get("forward")
    if getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is type(module).forward:
        del module.__dict__["forward"]


def remove_runtime(target: T) -> T:
    """Undo :func:`install_runtimes`: the hooks are removed from the registries (other hooks, accelerate's
    included, stay as they are) and the pipeline class restored; returns ``target``."""
    for module in denoisers_of(target).values():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(HOOK_NAME) is not None:
            with _accelerate_outside(module):
                registry.remove_hook(HOOK_NAME, recurse=False)
                _drop_plain_forward(module)
        module.__dict__.pop("tcpade", None)
    if not isinstance(target, torch.nn.Module):
        target.__dict__.pop("tcpade", None)
        target.__dict__.pop("tcpade_denoisers", None)
        base = getattr(type(target), "_tcpade_base_class", None)
        if base is not None:
            target.__class__ = base
    return target


def output_samples(output, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A pipeline output (``output_type="np"``: images (B, H, W, C) or video frames (B, F, H, W, C) in [0, 1]) as a
    tensor of ``dtype`` in [-1, 1], samples first, in the output's own layout."""
    import numpy as np

    array = getattr(output, "images", None)
    if array is None:
        array = getattr(output, "frames", None)
    if array is None:
        raise ValueError(f"the pipeline's output {type(output).__name__} has neither .images nor .frames")
    if isinstance(array, list):
        array = np.stack([np.asarray(a) for a in array])
    return torch.as_tensor(np.asarray(array)).to(dtype) * 2 - 1


def as_images(output) -> torch.Tensor:
    """A pipeline output (``output_type="np"``) as images (N, C, H, W) in [-1, 1]; video frames become images."""
    x = output_samples(output)
    return x.reshape(-1, *x.shape[-3:]).permute(0, 3, 1, 2)  # frames -> images
