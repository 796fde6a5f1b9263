"""Capture a transformer call as a flat FX graph with torch.export (non-strict).

A call is bound to the keyword arguments of the transformer's ``forward`` (:func:`bind_call`), flattened into
leaves (:func:`flatten_call`) and exported. :func:`capture_graph` traces the forward it is given: the runtime
passes the forward *below* its own diffusers hook, so that hooks other libraries installed on the transformer
(context-parallel input splitting, ...) are captured as the user's pipeline runs them.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree


class CaptureError(RuntimeError):
    """torch.export could not capture the transformer call; the message names the module and the cause."""


@dataclass
class CapturedGraph:
    """A transformer call as a GraphModule taking the flattened call leaves and returning the flat outputs.

    ``in_spec``/``out_spec`` are the pytree specs of ``(args, kwargs)`` and of the output; non-tensor leaves
    (``return_dict=False``, ints) are specialised in the graph but still passed positionally.
    """

    graph_module: torch.fx.GraphModule
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    example_leaves: list[Any]


def bind_call(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    """The call's arguments as keyword arguments of ``type(module).forward``, in signature order."""
    signature = inspect.signature(type(module).forward)
    bound = signature.bind(module, *args, **kwargs)
    named = dict(bound.arguments)
    named.pop(next(iter(signature.parameters)))  # self
    for name, p in signature.parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD and name in named:
            named.update(named.pop(name))
    return named


def ordered_kwargs(kwargs: dict, in_spec: pytree.TreeSpec) -> dict:
    """``kwargs`` reordered like the captured call (pytree specs of dicts are order-sensitive)."""
    keys = in_spec.child(1).context
    if set(keys) != set(kwargs):
        return kwargs
    return {k: kwargs[k] for k in keys}


def flatten_call(args: tuple, kwargs: dict, in_spec: pytree.TreeSpec | None = None) -> tuple[list, pytree.TreeSpec]:
    if in_spec is not None:
        kwargs = ordered_kwargs(kwargs, in_spec)
    return pytree.tree_flatten((tuple(args), dict(kwargs)))


def leaf_index(kwargs: dict, name: str, in_spec: pytree.TreeSpec) -> int:
    """Position of the keyword argument ``name`` among the flattened leaves of a call with ``in_spec``."""
    marker = object()
    leaves, _ = flatten_call((), {k: (marker if k == name else v) for k, v in kwargs.items()}, in_spec)
    for i, leaf in enumerate(leaves):
        if leaf is marker:
            return i
    raise KeyError(name)


def _sanitize(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]+", "_", name).strip("_")


def leaf_names(spec: pytree.TreeSpec, prefix: str = "", skip_first_key: bool = False) -> list[str]:
    """Readable, unique names of a spec's leaves (``hidden_states``, ``out_0``)."""
    dummy = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    paths, _ = pytree.tree_flatten_with_path(dummy)
    names: list[str] = []
    for path, _ in paths:
        if skip_first_key:
            path = path[1:]
        name = _sanitize(pytree.keystr(path)) or "x"
        if prefix or name[0].isdigit():
            name = f"{prefix or 'out'}_{name}"
        base, k = name, 1
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def strip_assertions(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Remove export's runtime metadata assertions: they are checks, and they keep dead producers alive."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in (
            torch.ops.aten._assert_tensor_metadata.default,
            torch.ops.aten._assert_scalar.default,
        ):
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


@contextlib.contextmanager
def tracing_forward(module: torch.nn.Module, forward: Callable | None):
    """Within the block, ``module.forward`` is ``forward`` (what torch.export traces); the instance attribute
    that was there before (a hook chain) is put back afterwards. ``None``: the class's own forward."""
    saved = module.__dict__.pop("forward", None)
    if forward is not None:
        module.forward = forward
    try:
        yield
    finally:
        module.__dict__.pop("forward", None)
        if saved is not None:
            module.forward = saved


def capture_graph(
    module: torch.nn.Module,
    args: tuple = (),
    kwargs: dict | None = None,
    dynamic_shapes: Any = None,
    forward: Callable | None = None,
) -> CapturedGraph:
    """Export ``module(*args, **kwargs)`` into a flat-input GraphModule whose parameters are the module's own.

    ``forward`` is the callable to trace in place of ``module.forward`` (default: the class's forward, without any
    instance-level hook chain). ``dynamic_shapes`` is passed to ``torch.export.export`` unchanged (default: static
    shapes); :mod:`tcpade_fx.passes.dynamic` uses it to keep batch and token axes symbolic.

    Raises :class:`CaptureError` naming the module when torch.export cannot capture it.
    """
    kwargs = dict(kwargs or {})
    try:
        with torch.no_grad(), tracing_forward(module, forward):
            ep = torch.export.export(module, tuple(args), kwargs, strict=False, dynamic_shapes=dynamic_shapes)
    except Exception as exc:  # export errors are many and deep; keep the cause attached
        raise CaptureError(
            f"tcpade_fx could not capture {type(module).__name__} with torch.export (non-strict): {exc}. "
            "Check that the transformer runs without data-dependent Python control flow for these inputs."
        ) from exc
    src = ep.module()
    gm = torch.fx.GraphModule(src, src.graph, class_name=f"Captured{type(module).__name__}")
    gm.graph._codegen = torch.fx.graph.CodeGen()
    gm.recompile()
    strip_assertions(gm)
    leaves, _ = flatten_call(args, kwargs, ep.call_spec.in_spec)
    return CapturedGraph(gm, ep.call_spec.in_spec, ep.call_spec.out_spec, leaves)
