"""Capture a transformer call as a flat FX graph with torch.export (non-strict), or by tracing real tensors.

A call is bound to the keyword arguments of the transformer's ``forward`` (:func:`bind_call`), flattened into
leaves (:func:`flatten_call`) and exported. :func:`capture_graph` traces the forward it is given: the runtime
passes the forward *below* its own diffusers hook, so that hooks other libraries installed on the transformer
(context-parallel input splitting, ...) are captured as the user's pipeline runs them.

When torch.export refuses a static-shape capture (Python-side logic on tensor values or symbolic sizes: a
``set`` of sequence lengths read with ``.tolist()``, an ``if`` on ``torch.max(position_ids)``, ...), the call is
traced again with real tensors (``make_fx``), so that Python sees concrete values (:func:`trace_real`). Every
value the forward reads out of a tensor (``.item()``, ``.tolist()``, ``bool()``, ``int()``, ...) becomes a
guard in the graph (``tcpade_fx::expect_value``): a later call whose value differs raises
:class:`ValueChangedError` instead of silently taking the branch of the captured call. A read of the ``timestep``
(a branch per step) is refused at capture; so is a traced graph that does not reproduce the forward bit for bit.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import weakref
from dataclasses import dataclass, field
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
    route: str = "torch.export"  # or "real-tensor trace" (:func:`trace_real`)
    notes: list[str] = field(default_factory=list)


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


#: The names a diffusers transformer's forward takes its model time under (HiDream's is ``timesteps``).
TIME_ARGUMENTS = ("timestep", "timesteps")


def time_argument(kwargs: dict) -> str | None:
    """The keyword of ``kwargs`` that carries the model time as a tensor (one of :data:`TIME_ARGUMENTS`), or None."""
    for name in TIME_ARGUMENTS:
        if isinstance(kwargs.get(name), torch.Tensor):
            return name
    return None


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
    *,
    fallback: bool = True,
) -> CapturedGraph:
    """Export ``module(*args, **kwargs)`` into a flat-input GraphModule whose parameters are the module's own.

    ``forward`` is the callable to trace in place of ``module.forward`` (default: the class's forward, without any
    instance-level hook chain). ``dynamic_shapes`` is passed to ``torch.export.export`` unchanged (default: static
    shapes); :mod:`tcpade_fx.passes.dynamic` uses it to keep batch and token axes symbolic.

    With static shapes and ``fallback``, a call torch.export refuses is traced with real tensors instead
    (:func:`trace_real`; ``CapturedGraph.route`` says which route was taken, ``notes`` why).

    Raises :class:`CaptureError` naming the module, the cause and what to do when neither route captures it.
    """
    kwargs = dict(kwargs or {})
    refused = _EXPORT_REFUSED.get(module)
    if refused is not None and dynamic_shapes is not None:
        # symbolic sizes only make export harder: do not spend another (slow) failing attempt
        raise CaptureError(
            f"tcpade_fx could not capture {type(module).__name__} with torch.export (non-strict): it refused the "
            f"module with static shapes already ({refused}), so dynamic shapes are not tried again"
        )
    if refused is not None and fallback:  # torch.export refused this module before: skip the failing attempt
        try:
            captured = trace_real(module, args, kwargs, forward=forward)
        except CaptureError:
            pass
        else:
            captured.notes.insert(0, f"{type(module).__name__}: torch.export refused an earlier call ({refused}); "
                                     "captured by tracing real tensors, with a guard on each tensor value the "
                                     "forward reads")
            return captured
    try:
        with torch.no_grad(), tracing_forward(module, forward):
            ep = torch.export.export(module, tuple(args), kwargs, strict=False, dynamic_shapes=dynamic_shapes)
    except Exception as exc:  # export errors are many and deep; keep the cause attached
        cause = _first_line(exc)
        if dynamic_shapes is not None or not fallback:
            raise CaptureError(
                f"tcpade_fx could not capture {type(module).__name__} with torch.export (non-strict): {exc}. "
                "Check that the transformer runs without data-dependent Python control flow for these inputs."
            ) from exc
        try:
            captured = trace_real(module, args, kwargs, forward=forward)
        except CaptureError as second:
            raise CaptureError(
                f"tcpade_fx could not capture {type(module).__name__}: torch.export (non-strict) refused it "
                f"({cause}), and tracing it with real tensors failed too: {second}"
            ) from exc
        captured.notes.insert(0, f"{type(module).__name__}: torch.export refused the call ({cause}); captured by "
                                 "tracing real tensors, with a guard on each tensor value the forward reads")
        _EXPORT_REFUSED[module] = cause
        return captured
    src = ep.module()
    gm = torch.fx.GraphModule(src, src.graph, class_name=f"Captured{type(module).__name__}")
    gm.graph._codegen = torch.fx.graph.CodeGen()
    gm.recompile()
    strip_assertions(gm)
    if dynamic_shapes is not None:
        sizes_from_inputs(gm)
    leaves, _ = flatten_call(args, kwargs, ep.call_spec.in_spec)
    return CapturedGraph(gm, ep.call_spec.in_spec, ep.call_spec.out_spec, leaves)


def sizes_from_inputs(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Read each symbolic size off an input where one has it: ``sym_size(x, d)`` of an intermediate ``x`` whose
    value is the size of an input axis becomes ``sym_size(input, axis)``. Same values (torch.export proved them
    equal), but shape arithmetic no longer depends on the tensors it was read from: AuraFlow slices its joint
    sequence by ``encoder_hidden_states.size(1)`` read *after* the joint blocks, which would tie the tail to the
    text stream inside the block stack."""
    graph = gm.graph
    sym_size = torch.ops.aten.sym_size.int
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    axes: dict = {}
    for node in placeholders:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            for axis, size in enumerate(val.shape):
                if isinstance(size, torch.SymInt):
                    axes.setdefault(size.node.expr, (node, axis))
    existing = {(n.args[0], n.args[1]): n for n in graph.nodes
                if n.op == "call_function" and n.target is sym_size and n.args[0] in placeholders}
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not sym_size or node.args[0] in placeholders:
            continue
        val = node.meta.get("val")
        key = axes.get(val.node.expr) if isinstance(val, torch.SymInt) else None
        if key is None:
            continue
        if key not in existing:
            with graph.inserting_after(placeholders[-1]):
                existing[key] = graph.call_function(sym_size, key)
            existing[key].meta = dict(node.meta)
        node.replace_all_uses_with(existing[key])
        graph.erase_node(node)
        changed = True
    if changed:
        graph.lint()
        gm.recompile()
    return gm


#: Modules torch.export refused (static shapes) and the real-tensor route captured, with the refusal: a new
#: input signature of the same module goes to that route directly.
_EXPORT_REFUSED: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text if len(text) <= limit else text[:limit] + "..."


# -- the real-tensor route ------------------------------------------------------------------------------------
class ValueChangedError(RuntimeError):
    """A graph traced with real tensors met a tensor value that differs from the one its forward read in Python
    at capture (the graph holds only the branch taken then)."""


_READS = {
    torch.Tensor.item: "item()",
    torch.Tensor.tolist: "tolist()",
    torch.Tensor.__bool__: "bool()",
    torch.Tensor.__int__: "int()",
    torch.Tensor.__float__: "float()",
    torch.Tensor.__index__: "an index",
    torch.Tensor.numpy: "numpy()",
}


def _read(x: torch.Tensor, kind: str):
    if kind == "numpy()":
        return x.detach().cpu().numpy()
    if kind == "tolist()":
        return x.tolist()
    if kind == "bool()":
        return bool(x)
    if kind == "int()":
        return int(x)
    if kind == "float()":
        return float(x)
    if kind == "an index":
        return x.__index__()
    return x.item()


@torch.library.custom_op("tcpade_fx::expect_value", mutates_args=())
def expect_value(x: torch.Tensor, expected: torch.Tensor, kind: str, where: str) -> None:
    """The guard of a tensor value read in Python at capture: raises :class:`ValueChangedError` when ``x`` now
    reads (as ``kind``) differently from ``expected``."""
    now = torch.as_tensor(_read(x, kind))
    if now.shape != expected.shape or not torch.equal(now.to(expected.dtype), expected.to(now.device)):
        shown = lambda t: t.tolist() if t.numel() <= 8 else f"a tensor of shape {tuple(t.shape)}"  # noqa: E731
        raise ValueChangedError(
            f"{where}: the forward read a tensor value in Python ({kind}) that was {shown(expected)} when the graph "
            f"was captured and is {shown(now)} now. This model was captured by tracing real tensors (torch.export "
            "refused it), so its graph holds only the code path of the captured value. Keep that input fixed over "
            "the run, make the model's Python logic independent of tensor values so that torch.export accepts it, "
            "or run this model without tcpade_fx (tcpade_fx.disable)."
        )


@expect_value.register_fake
def _(x, expected, kind, where):
    return None


torch.fx.node.has_side_effect(torch.ops.tcpade_fx.expect_value.default)


def _user_frame() -> str:
    """``file:line in function: code`` of the innermost frame outside torch and this module."""
    import traceback

    here = __file__.rsplit(".", 1)[0]
    for frame in reversed(traceback.extract_stack()):
        name = frame.filename.replace("\\", "/")
        if "/torch/" in name or name.startswith(here) or "/contextlib.py" in name:
            continue
        return f"{name.rsplit('/', 1)[-1]}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"
    return "unknown location"


class _GuardValueReads(torch.overrides.TorchFunctionMode):
    """While tracing: each tensor value read in Python is also recorded in the graph as a guard."""

    def __init__(self, owner: str):
        super().__init__()
        self.owner = owner
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        kind = _READS.get(func)
        if kind is not None and args and isinstance(args[0], torch.Tensor):
            where = f"{self.owner} ({_user_frame()})"
            self.reads.append(where)
            expected = torch.as_tensor(out if kind != "numpy()" else out.copy())
            torch.ops.tcpade_fx.expect_value(args[0], expected, kind, where)
        return out


def _mutates(node: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


#: The call's arguments that change at every step of a trajectory.
_STEPPING = (*TIME_ARGUMENTS, "hidden_states")


def _ancestors(node: torch.fx.Node) -> set:
    seen, todo = set(), [node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def trace_real(module: torch.nn.Module, args: tuple = (), kwargs: dict | None = None,
               forward: Callable | None = None) -> CapturedGraph:
    """Capture ``module(*args, **kwargs)`` by tracing it with real tensors (``make_fx``, then functionalised), for
    forwards whose Python-side logic torch.export rejects. Same calling convention as :func:`capture_graph`:
    the graph takes every flattened call leaf (non-tensor leaves are specialised, still passed positionally).

    Raises :class:`CaptureError` when tracing fails, when the forward reads the ``timestep`` value in Python (a
    branch per step cannot be one graph), or when the traced graph does not reproduce the forward bit for bit
    (e.g. a write through ``.data``, which tracing does not see).
    """
    from torch.fx.experimental.proxy_tensor import make_fx
    import torch.fx.traceback as fx_traceback

    kwargs = dict(kwargs or {})
    name = type(module).__name__
    leaves, in_spec = flatten_call(args, kwargs)
    positions = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
    tensors = [leaves[i] for i in positions]
    guards = _GuardValueReads(name)
    result: dict = {}

    def call(*ts):
        full = list(leaves)
        for i, t in zip(positions, ts):
            full[i] = t
        a, k = pytree.tree_unflatten(full, in_spec)
        with guards:
            out = module(*a, **k)
        flat, result["spec"] = pytree.tree_flatten(out)
        result["outputs"] = [t.detach().clone() if isinstance(t, torch.Tensor) else t for t in flat]
        return flat

    call._orig_mod = module  # make_fx records nn_module_stack relative to this root
    try:
        with torch.no_grad(), tracing_forward(module, forward):
            first = make_fx(call, tracing_mode="real", record_module_stack=True,
                            _error_on_data_dependent_ops=False)(*tensors)
            first.graph.eliminate_dead_code()  # the reads themselves (their values went to Python; guards stay)
            first.recompile()
            traced = first

            def replay(*ts):
                return torch.fx.Interpreter(first).run(*ts)

            # functionalise (slice assignments into padded buffers become scatters): the block stack's input and
            # output are then values, not buffers written later; the first trace's module paths are kept
            if any(_mutates(n) for n in first.graph.nodes):
                with fx_traceback.preserve_node_meta():
                    traced = make_fx(torch.func.functionalize(replay, remove="mutations"), tracing_mode="real",
                                     _error_on_data_dependent_ops=False)(*tensors)
    except CaptureError:
        raise
    except Exception as exc:
        raise CaptureError(f"tracing {name} with real tensors failed: {_first_line(exc)}") from exc

    # every leaf as a placeholder, named like torch.export names them
    names = leaf_names(in_spec, skip_first_key=True)
    graph = torch.fx.Graph()
    old = [n for n in traced.graph.nodes if n.op == "placeholder"]
    val_map: dict = {}
    for i, leaf in enumerate(leaves):
        ph = graph.placeholder(names[i])
        if i in positions:
            src = old[positions.index(i)]
            ph.meta = dict(src.meta)
            val_map[src] = ph
        else:
            ph.meta["val"] = leaf
    out = graph.graph_copy(traced.graph, val_map)
    graph.output(out)
    gm = torch.fx.GraphModule(traced, graph, class_name=f"Traced{name}")
    gm.graph.lint()
    gm.recompile()

    checks = [n for n in gm.graph.nodes if n.target is torch.ops.tcpade_fx.expect_value.default]
    # a number read from the timestep or the sample changes at every step: refuse now rather than at step 2
    # (a bool() read stays guarded: the branch it takes may hold for the whole run)
    stepping = [n for n in gm.graph.nodes if n.op == "placeholder" and n.target in _STEPPING]
    for node in checks:
        read = [p.target for p in stepping if p in _ancestors(node)]
        if read and node.args[2] != "bool()":
            raise CaptureError(
                f"{node.args[3]}: the forward reads a number from its `{read[0]}` in Python ({node.args[2]}), and "
                "that value changes at every step, so one captured graph cannot serve the run (torch.export "
                f"refused {name} too). Compute it with tensor ops instead, pass it as a Python number, or run "
                "this model without tcpade_fx"
            )
    with torch.no_grad():
        try:
            got = gm(*leaves)
        except ValueChangedError as exc:  # reads that differ on a replay of the same inputs: not deterministic
            raise CaptureError(f"the graph traced from {name} does not replay its own inputs: {exc}") from exc
    ref = result["outputs"]
    mismatched = [i for i, (r, g) in enumerate(zip(ref, got)) if isinstance(r, torch.Tensor)
                  and not (isinstance(g, torch.Tensor) and r.shape == g.shape and torch.equal(r, g))]
    if len(got) != len(ref) or mismatched:
        raise CaptureError(
            f"the graph traced from {name} with real tensors does not reproduce its forward bit for bit (outputs "
            f"{mismatched or 'count'} differ): the forward computes something tracing does not see, such as a "
            "write through `.data` or a tensor made from NumPy. Change the inputs so that the model takes another "
            "path (e.g. sizes its precomputed embeddings were built for) or run it without tcpade_fx"
        )
    return CapturedGraph(gm, in_spec, result["spec"], list(leaves), route="real-tensor trace",
                         notes=[f"{len(checks)} guarded tensor read(s)"] if checks else [])
