"""Pipeline glue: the one entry point :func:`compile` and its inverse :func:`disable`."""

from __future__ import annotations

import functools
from typing import TypeVar

import torch

from .policy import Policy, resolve_policy
from .runtime import BACKENDS, TCPadeRuntime

T = TypeVar("T")

_CACHE_HOOK_MARKERS = ("cache", "pyramid", "broadcast", "taylorseer", "fbc_")  # fbc_: first-block cache


def _transformer_of(target) -> torch.nn.Module:
    if isinstance(target, torch.nn.Module):
        return target
    transformer = getattr(target, "transformer", None)
    if isinstance(transformer, torch.nn.Module):
        return transformer
    raise TypeError(
        f"tcpade_fx.compile expects a diffusers pipeline with a `.transformer` or a transformer nn.Module, got "
        f"{type(target).__name__}. UNet pipelines have no transformer-block stack to cache."
    )


def _active_cache_hooks(module: torch.nn.Module) -> list[str]:
    found = []
    if getattr(module, "is_cache_enabled", False):
        found.append(f"{type(module).__name__}.enable_cache(...)")
    for name, sub in module.named_modules():
        registry = getattr(sub, "_diffusers_hook", None)
        hooks = getattr(registry, "hooks", None) or {}
        for hook_name in hooks:
            if any(marker in hook_name.lower() for marker in _CACHE_HOOK_MARKERS):
                found.append(f"{hook_name!r} on {name or type(module).__name__}")
    return found


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


def _scheduler_step_index(scheduler) -> int | None:
    """The index of the step the scheduler is at (None where it does not say, e.g. before its first step)."""
    for name in ("step_index", "begin_index"):
        value = getattr(scheduler, name, None)
        if isinstance(value, (int, torch.Tensor)) and not isinstance(value, bool):
            return int(value)
    return None


def _require_one_call_per_step(scheduler) -> None:
    timesteps = scheduler.timesteps
    if len(timesteps) > 1 and bool((timesteps[1:] == timesteps[:-1]).any()):
        raise ValueError(
            f"{type(scheduler).__name__} evaluates the transformer more than once per step at repeated times (a "
            "Heun/KDPM2-type second-order sampler); TC-Padé needs one evaluation per step to extrapolate along. Use "
            "a first-order scheduler (FlowMatchEulerDiscreteScheduler) or a multistep solver "
            "(UniPCMultistepScheduler, DPMSolverMultistepScheduler), or tcpade_fx.disable(pipe) for this sampler."
        )


def _pipeline_class_with_reset(cls: type) -> type:
    base_call = cls.__call__

    @functools.wraps(base_call)
    def __call__(self, *args, **kwargs):
        runtime: TCPadeRuntime = self.tcpade
        scheduler = getattr(self, "scheduler", None)
        wrapped = ("set_timesteps", "step")
        originals = {n: scheduler.__dict__.get(n) for n in wrapped} if scheduler is not None else {}

        if scheduler is not None:
            bound_set = type(scheduler).set_timesteps.__get__(scheduler)
            bound_step = type(scheduler).step.__get__(scheduler)

            # wraps: pipelines inspect set_timesteps' signature (retrieve_timesteps looks for `sigmas`/`timesteps`)
            @functools.wraps(bound_set)
            def set_timesteps(*a, **k):
                result = bound_set(*a, **k)
                _require_one_call_per_step(scheduler)
                runtime.begin(num_steps=len(scheduler.timesteps), schedule=_time_grids(scheduler),
                              step_index=lambda: _scheduler_step_index(scheduler))
                return result

            @functools.wraps(bound_step)
            def step(*a, **k):
                result = bound_step(*a, **k)
                runtime.step_done()
                return result

            scheduler.set_timesteps = set_timesteps
            scheduler.step = step
        runtime.begin(None)
        try:
            return base_call(self, *args, **kwargs)
        finally:
            for name, original in originals.items():
                if original is None:
                    scheduler.__dict__.pop(name, None)
                else:
                    setattr(scheduler, name, original)

    return type(cls.__name__, (cls,), {"__call__": __call__, "_tcpade_base_class": cls})


def compile(
    target: T,
    policy: Policy | str = "balanced",
    backend: str = "eager",
    *,
    verify: bool = True,
    block_prefixes: tuple[str, ...] | None = None,
) -> T:
    """Make a diffusers pipeline (or a bare DiT-family transformer) sample with TC-Padé; returns it, mutated.

    The transformer is captured with torch.export at its first call (shapes are the user's), its block stack is
    located, split off and verified against the original, and two graphs are installed: one that computes the
    stack and one that replaces it with the Padé-predicted residual. A Python controller picks one per step.

    Args:
        target: a pipeline with a ``.transformer`` (DiT, Flux, Wan, SD3, PixArt, ...) or the transformer itself.
            With a bare transformer, steps are identified from the ``timestep`` it receives; call
            ``transformer.tcpade.begin(num_steps)`` before each trajectory for exact stage boundaries.
        policy: ``"quality"``, ``"balanced"``, ``"fast"``, ``"full"`` or a :class:`tcpade_fx.Policy`.
        backend: ``"eager"``, ``"inductor"`` (each graph compiled once) or ``"tensorrt"``.
        verify: check the split and rewrite against the original on the first call's inputs before use.
        block_prefixes: names of the block ModuleList(s) when the model is not one of the known families.

    The runtime and its stats are at ``target.tcpade`` (``target.tcpade.stats``).
    """
    policy = resolve_policy(policy)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "tensorrt":
        from .export.tensorrt import require_tensorrt

        require_tensorrt()
    transformer = _transformer_of(target)
    hooks = _active_cache_hooks(transformer)
    if hooks:
        raise RuntimeError(
            "a diffusers cache is already enabled on this transformer (" + ", ".join(hooks) + "). Two caches "
            "would skip work on each other's predictions; disable it first (transformer.disable_cache() or "
            "diffusers.hooks.HookRegistry.remove_hook) and call tcpade_fx.compile again."
        )
    return install(target, TCPadeRuntime(transformer, policy, backend, verify=verify, block_prefixes=block_prefixes))


def install(target: T, runtime: TCPadeRuntime) -> T:
    """Put ``runtime`` in place of the transformer's forward (replacing an earlier one) and, for a pipeline, make
    each pipeline call start a new trajectory. Used by :func:`compile` and by the exported-graph runners."""
    transformer = _transformer_of(target)
    if getattr(transformer, "tcpade", None) is not None:
        disable(target)
    transformer.forward = runtime
    transformer.tcpade = runtime
    if target is not transformer:
        target.tcpade = runtime
        cls = type(target)
        if not hasattr(cls, "_tcpade_base_class"):
            target.__class__ = _pipeline_class_with_reset(cls)
    return target


def disable(target: T) -> T:
    """Undo :func:`compile`: the original forward (and pipeline class) are restored; returns ``target``."""
    transformer = _transformer_of(target)
    transformer.__dict__.pop("forward", None)
    transformer.__dict__.pop("tcpade", None)
    if target is not transformer:
        target.__dict__.pop("tcpade", None)
        base = getattr(type(target), "_tcpade_base_class", None)
        if base is not None:
            target.__class__ = base
    return target
