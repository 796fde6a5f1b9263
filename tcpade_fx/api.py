"""The one entry point :func:`compile` and its inverse :func:`disable`."""

from __future__ import annotations

from typing import TypeVar

from .backends import get_backend
from .integration import active_cache_hooks, denoisers_of, install_runtimes, remove_runtime
from .policy import Policy, resolve_policy
from .runtime import TCPadeRuntime

T = TypeVar("T")


def compile(
    target: T,
    policy: Policy | str = "balanced",
    backend: str = "eager",
    *,
    verify: bool = True,
    block_prefixes: tuple[str, ...] | None = None,
    backend_options: dict | None = None,
    dynamic_shapes: bool = True,
    max_graph_sets: int = 4,
    process_group=None,
) -> T:
    """Make a diffusers pipeline (or a bare DiT-family transformer) sample with TC-Padé; returns it, mutated.

    The transformer is captured with torch.export at its first call (shapes are the user's), its block stack is
    located, split off and verified against the original, and two graphs are installed: one that computes the
    stack and one that replaces it with the Padé-predicted residual. A Python controller picks one per step. The
    runtime is a diffusers hook (``"tcpade_fx"`` in the transformer's ``HookRegistry``): it composes with hooks
    other libraries install (model CPU offload in either order, context parallelism) and is removed by
    :func:`disable`.

    Args:
        target: a pipeline with a ``.transformer`` (DiT, Flux, Wan, SD3, PixArt, ...) or the transformer itself.
            With a bare transformer, steps are identified from the ``timestep`` it receives; call
            ``transformer.tcpade.begin(num_steps)`` before each trajectory for exact stage boundaries.
        policy: ``"quality"``, ``"balanced"``, ``"fast"``, ``"full"`` or a :class:`tcpade_fx.Policy`.
        backend: a registered backend (:func:`tcpade_fx.backends.registered_backends`): ``"eager"``,
            ``"inductor"`` (each graph compiled once) or ``"tensorrt"``.
        verify: check the rewrite against the original forward on the first call's inputs before use.
        block_prefixes: names of the block ModuleList(s) when the model is not one of the known families.
        backend_options: keyword arguments for the backend's compiler (e.g. ``torch.compile`` options).
        dynamic_shapes: capture with symbolic batch and token axes where the model allows, so that new
            resolutions and batch sizes reuse the graphs (each new shape is checked once against the eager
            forward); False captures once per input signature.
        max_graph_sets: graph sets held at most (least recently used dropped, with a note);
            ``target.tcpade.graph_sets`` counts them, ``target.tcpade.clear_graphs()`` drops them.
        process_group: the ``torch.distributed`` group whose processes each hold part of every step's tokens, for
            a custom context-parallel setup. Not needed with diffusers' context parallelism
            (``transformer.enable_parallelism(config=ContextParallelConfig(...))``, before or after this call): its
            mesh is found at each call. Either way every statistic behind a decision or a prediction is reduced
            over the group and every process takes the same decisions (:mod:`tcpade_fx.distributed`).

    Every transformer the pipeline denoises with gets its own runtime (Wan 2.2: ``transformer`` and
    ``transformer_2``), driven by the pipeline's scheduler. The runtime and its stats are at ``target.tcpade``
    (``target.tcpade.stats``; the ``transformer``'s), each denoiser's at ``target.tcpade_denoisers[name]``.

    Raises:
        ValueError: an unknown policy or backend (the message lists what exists).
        RuntimeError: a diffusers cache is already enabled, or a hook that moves weights inside the forward
            (sequential/group offload, layerwise casting) is installed; the message says what to do.
    """
    policy = resolve_policy(policy)
    get_backend(backend).require()
    denoisers = denoisers_of(target)
    for name, transformer in denoisers.items():
        hooks = active_cache_hooks(transformer)
        if hooks:
            raise RuntimeError(
                f"a diffusers cache is already enabled on {name} (" + ", ".join(hooks) + "). Two caches would skip "
                "work on each other's predictions; disable it first (transformer.disable_cache() or "
                "diffusers.hooks.HookRegistry.remove_hook) and call tcpade_fx.compile again."
            )
    runtimes = {name: TCPadeRuntime(transformer, policy, backend, verify=verify, block_prefixes=block_prefixes,
                                    backend_options=backend_options, dynamic_shapes=dynamic_shapes,
                                    max_graph_sets=max_graph_sets, process_group=process_group)
                for name, transformer in denoisers.items()}
    return install_runtimes(target, runtimes)


def disable(target: T) -> T:
    """Undo :func:`compile`: the ``"tcpade_fx"`` hook is removed (other hooks stay) and the pipeline class
    restored; returns ``target``."""
    return remove_runtime(target)
