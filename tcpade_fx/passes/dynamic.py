"""Dynamic-shape discovery: capture a call with symbolic batch and token axes where the model allows them.

:func:`capture_dynamic` returns the capture, its block-stack plan and a :class:`ShapePlan`: which axes are dynamic
(and why the others are static). Which axes become dynamic, generically, without per-model tables:

1. Discovery: the call is captured once with ``torch.export.Dim.AUTO`` on every axis of every tensor input.
   torch.export specialises the axes the model fixes outright (a Linear's input width, Flux's 3 RoPE id columns,
   sizes 0 and 1) and leaves a symbol on the others. This keeps Flux's text-token axis apart from its channel
   axis when both are 8 in the example.
2. Grouping: the axes that share the symbol of ``hidden_states``' axis 0 form the dimension ``batch`` (torch.export
   gives axes it equates one symbol; an axis that merely has the batch's size, like the 4 text-token ids of the
   bundled mnist-flux next to its batch of 4, is not one of them); the other free axes are grouped by example
   size (``tokens_16``, ``tokens_8``). Each group is then judged with the
   guards the discovery capture recorded, its sizes set to :func:`probe_size` of the example: axes a guard pins
   stay static (DiT: ``hidden_states[2] // 4 == 7``, its position embedding and unpatchify), and the group is
   split into the smallest sets of axes that can change size on their own (``tokens_16``, ``tokens_16_b``).
   Axes the graph only accepts equal stay together (Flux's image tokens and ``img_ids`` rows: torch.export
   relates them only through ``txt + img == len(txt_ids) + len(img_ids)``), axes it lets vary independently are
   kept apart even when their example sizes are equal (Flux with as many image as text tokens).
3. Capture with these named dimensions. A dimension torch.export refuses (a constraint violation names it) is
   dropped, i.e. its axes stay static, and the capture retried; a refusal that names no dimension is resolved by
   adding the dimensions one at a time. The residual's axes must be the dimensions themselves or ``a*dim + b``
   (``predict`` takes the residual as an input); otherwise the dimensions it depends on are dropped as well.

Limits: the guards are judged at one probe size, and those that do not evaluate to true or false there (float
arithmetic on sizes) are skipped. A dimension the graph cannot take is still refused by the capture in step 3,
and a graph that is wrong at other sizes by the export check (onnxruntime against PyTorch with the token
dimensions moved); axes kept together that could in fact vary apart are not detected, and only restrict the
calls the export accepts. An axis whose size the discovery expresses through another (``2*s``, ``s + 1``: a
patchified height) stays static.

Every static axis of a tensor input keeps its reason (``static_axes``), which the manifest records.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils import _pytree as pytree

from .capture import CapturedGraph, capture_graph, flatten_call, leaf_names
from .locate import BlockStackPlan, locate_block_stack

BATCH = "batch"
BATCH_RANGE = (1, 4096)
#: Token dimensions accept any size from 1 up (no upper bound), unless a guard of the model excludes 1.
TOKEN_MIN = 1


def leaf_layout(leaf) -> tuple:
    """What a call leaf is, without its values: ("T", shape, dtype, device) for a tensor, ("V", repr) otherwise
    (a layout passes through unchanged)."""
    if isinstance(leaf, tuple) and leaf and leaf[0] in ("T", "V"):
        return leaf
    if isinstance(leaf, torch.Tensor):
        return ("T", tuple(leaf.shape), leaf.dtype, leaf.device)
    return ("V", repr(leaf))


@dataclass
class ShapePlan:
    """Which axes of a capture are dynamic, and why the others are static."""

    batch_size: int | None  # the example batch when the batch axis is dynamic
    batch_leaves: list[int]  # leaf positions whose axis 0 is the symbolic batch
    #: name -> {"example": size, "min": int, "max": int | None} of every dynamic dimension (``batch`` included)
    dims: dict[str, dict] = field(default_factory=dict)
    #: leaf position -> {axis: dimension name} of the dynamic axes
    dynamic_axes: dict[int, dict[int, str]] = field(default_factory=dict)
    #: leaf position -> {axis: why it is static} for the static axes of tensor leaves
    static_axes: dict[int, dict[int, str]] = field(default_factory=dict)
    #: residual axis -> (dimension name, scale, offset): size = scale * dimension + offset
    residual_axes: dict[int, tuple[str, int, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def token_dims(self) -> list[str]:
        return [name for name in self.dims if name != BATCH]

    def export_dims(self) -> dict:
        """Fresh ``torch.export.Dim`` objects for the dynamic dimensions (name -> Dim)."""
        return {name: torch.export.Dim(name, min=d["min"], max=d["max"]) for name, d in self.dims.items()}

    def accepts(self, example: list, leaves: list) -> bool:
        """Whether a graph captured on ``example`` leaves runs ``leaves``: the same constants, tensor dtypes,
        devices and ranks, the example's size on every static axis, and on the dynamic axes sizes within their
        dimension's range, equal wherever they share a dimension. ``example`` may hold :func:`leaf_layout`s."""
        if len(example) != len(leaves):
            return False
        sizes: dict[str, int] = {}
        for i, (want, got) in enumerate(zip(example, leaves)):
            want, got = leaf_layout(want), leaf_layout(got)
            if want[0] != got[0] or (want[0] == "V" and want != got):
                return False  # a tensor for a constant, or another constant
            if want[0] == "V":
                continue
            if want[2:] != got[2:] or len(want[1]) != len(got[1]):
                return False  # dtype, device or rank
            dynamic = self.dynamic_axes.get(i, {})
            for axis, (w, g) in enumerate(zip(want[1], got[1])):
                name = dynamic.get(axis)
                if name is None:
                    if w != g:
                        return False
                    continue
                lo, hi = self.dims[name]["min"], self.dims[name]["max"]
                if g < lo or (hi is not None and g > hi) or sizes.setdefault(name, g) != g:
                    return False
        return True

    def dynamic_shapes(self, dims: dict, tensor_positions: list[int], residual: bool = False,
                       gate: bool = False) -> tuple | None:
        """``dynamic_shapes`` for a tensor-only wrapper of a graph: one entry per tensor leaf (``tensor_positions``),
        plus the residual input with ``residual``, plus the input gate's terms (``Policy.input_gate``: shape
        ``(4, *residual)``, the residual's axes one further) with ``gate``; ``None`` when every axis is static."""
        specs = [{a: dims[n] for a, n in self.dynamic_axes.get(i, {}).items()} or None for i in tensor_positions]
        if residual:
            specs.append({a: residual_dim(dims[n], k, b) for a, (n, k, b) in self.residual_axes.items()} or None)
        if gate:
            specs.append({a + 1: residual_dim(dims[n], k, b) for a, (n, k, b) in self.residual_axes.items()} or None)
        return (tuple(specs),) if any(s is not None for s in specs) else None

FIXED = "fixed by the model: torch.export specialised it when left free"
NOT_TRIED = "not tried: dynamic_tokens=False"


def _small(n: int) -> str:
    return f"size {n} in the example: torch.export specialises sizes 0 and 1"


class _Refused(Exception):
    def __init__(self, blamed: list[str], message: str):
        super().__init__(message)
        self.blamed = blamed


def residual_dim(dim, scale: int, offset: int):
    """``scale * dim + offset`` as a torch.export (derived) dimension."""
    return dim if (scale, offset) == (1, 0) else dim * scale + offset


def axis_expr(name: str, scale: int, offset: int) -> str:
    text = name if scale == 1 else f"{scale}*{name}"
    return text if not offset else f"{text}{offset:+d}"


def _batch_leaf(kwargs: dict) -> torch.Tensor | None:
    """The input whose axis 0 defines the batch: ``hidden_states``, else the first tensor with an axis."""
    hs = kwargs.get("hidden_states")
    if isinstance(hs, torch.Tensor) and hs.dim() >= 1:
        return hs
    return next((x for x in pytree.tree_leaves(kwargs) if isinstance(x, torch.Tensor) and x.dim() >= 1), None)


def _kwargs_spec(kwargs: dict, per_tensor: dict[int, dict]) -> dict | None:
    """``dynamic_shapes`` of the call's kwargs from ``{id(tensor leaf): {axis: Dim}}`` (None: all static)."""
    if not any(per_tensor.values()):
        return None
    leaves, spec = flatten_call((), kwargs)
    _, tree = pytree.tree_unflatten([per_tensor.get(id(x)) or None for x in leaves], spec)
    return tree


def _expr(size):
    """An int for a static size, else the sympy expression of the symbolic size."""
    if isinstance(size, torch.SymInt):
        expr = size.node.expr
        return int(expr) if expr.is_number else expr
    return int(size)


def _placeholder_shapes(captured) -> dict[int, list]:
    """id(tensor leaf) -> per-axis :func:`_expr` of the captured graph's input."""
    nodes = [n for n in captured.graph_module.graph.nodes if n.op == "placeholder"]
    if len(nodes) != len(captured.example_leaves):
        raise RuntimeError("captured graph inputs do not match the call leaves")
    out = {}
    for x, node in zip(captured.example_leaves, nodes):
        val = node.meta.get("val")
        if isinstance(x, torch.Tensor) and isinstance(val, torch.Tensor):
            out[id(x)] = [_expr(d) for d in val.shape]
    return out


@dataclass
class _Discovery:
    """The capture with ``Dim.AUTO`` on every axis: which sizes stayed symbolic, and the guards on them."""

    shapes: dict[int, list]  # id(tensor leaf) -> per axis an int (specialised) or a sympy expression
    guards: list  # sympy booleans the captured graph assumes (guards and deferred runtime assertions)
    hints: dict  # symbol -> example value
    labels: dict  # symbol -> "input[axis]" where it first appears (the input symbols)

    def _definitions(self) -> dict:
        """Symbols of intermediate sizes that a guard equates to an expression of others (``Eq(s53, s47)``)."""
        import sympy

        defs: dict = {}
        for guard in self.guards:
            if isinstance(guard, sympy.Eq):
                for a, b in ((guard.lhs, guard.rhs), (guard.rhs, guard.lhs)):
                    if a.is_Symbol and a not in self.labels and a not in defs and a not in b.free_symbols:
                        defs[a] = b
                        break
        return defs

    def rejects(self, values: dict):
        """The first guard that is false with ``values`` (input symbol -> int), intermediate symbols following
        the inputs they are equated to and the others at their example values, or None. Guards that do not
        evaluate to a truth value are skipped."""
        import sympy

        subs = {s: sympy.Integer(v) for s, v in {**self.hints, **values}.items()}
        defs = self._definitions()
        for _ in range(len(defs)):
            changed = False
            for symbol, expr in defs.items():
                try:
                    value = expr.xreplace(subs)
                except Exception:
                    continue
                if value.is_Integer and subs.get(symbol) != value:
                    subs[symbol], changed = value, True
            if not changed:
                break
        moved = set(values) | {s for s in defs if subs.get(s) != self.hints.get(s)}
        for guard in self.guards:
            if not guard.free_symbols & moved:
                continue
            try:
                if guard.xreplace(subs) == sympy.false:
                    return guard
            except Exception:  # float or unknown functions that do not evaluate: not a guard we can judge
                continue
        return None

    def readable(self, guard) -> str:
        import sympy

        named = guard.xreplace({s: sympy.Symbol(self.labels.get(s, str(s))) for s in guard.free_symbols})
        ops = {sympy.Eq: "==", sympy.Ne: "!="}
        return f"{named.lhs} {ops[type(named)]} {named.rhs}" if type(named) in ops else str(named)


def _discover_free_axes(module, kwargs, forward=None) -> _Discovery:
    """Capture with ``Dim.AUTO`` on every axis of every tensor input (see the module docstring)."""
    leaves, spec = flatten_call((), kwargs)
    auto = {id(x): {a: torch.export.Dim.AUTO for a in range(x.dim())} for x in leaves if isinstance(x, torch.Tensor)}
    captured = capture_graph(module, (), kwargs, dynamic_shapes=_kwargs_spec(kwargs, auto), forward=forward)
    shapes = _placeholder_shapes(captured)
    names = dict(zip(map(id, captured.example_leaves), leaf_names(captured.in_spec, skip_first_key=True)))
    labels = {}
    for key, exprs in shapes.items():
        for axis, expr in enumerate(exprs):
            if not isinstance(expr, int) and expr.is_Symbol:
                labels.setdefault(expr, f"{names[key]}[{axis}]")
    env = next((n.meta["val"].fake_mode.shape_env for n in captured.graph_module.graph.nodes
                if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)
                and getattr(n.meta["val"], "fake_mode", None) is not None), None)
    guards, hints = [], {}
    if env is not None:
        guards = [g.expr for g in env.guards]
        guards += [a.expr for asserts in env.deferred_runtime_asserts.values() for a in asserts]
        values = env.backed_var_to_val if hasattr(env, "backed_var_to_val") else env.var_to_val
        hints = {s: int(v) for s, v in values.items()}
    return _Discovery(shapes, guards, hints, labels)


def probe_size(example: int) -> int:
    """The other size a token dimension is tried at (guards of the discovery capture, the export check):
    1.5 x the example (16 -> 24, 8 -> 12)."""
    return example + max(1, example // 2)


@dataclass
class _AxisPlan:
    groups: dict[str, list[tuple[int, int]]]  # dimension -> [(id(tensor leaf), axis)]
    examples: dict[str, int]
    symbols: dict[str, set]  # dimension -> the distinct Dim.AUTO symbols it ties
    static: dict[int, dict[int, str]]  # id(tensor leaf) -> {axis: reason}


def _plan_axes(leaves, free: _Discovery | None, batch_leaf, want_batch: bool, dynamic_tokens: bool,
               dynamic_batch: bool) -> _AxisPlan:
    """Group the tensor axes into dimensions. The batch: with a discovery, the axes sharing the symbol of
    ``batch_leaf``'s axis 0 (torch.export gives axes it equates one symbol), so that an axis whose example size
    merely equals the batch (Flux's 4 text-token ids next to a batch of 4) is a token axis; without one, axis 0
    of every input whose first size is the example batch."""
    batch = None if batch_leaf is None else int(batch_leaf.shape[0])
    plan = _AxisPlan({}, {}, {}, {})
    no_batch = ("dynamic_batch=False" if not dynamic_batch
                else f"the example batch is {batch} (a dynamic batch needs >= 2)")
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]

    def add(name, x, axis, size, symbol=None):
        plan.groups.setdefault(name, []).append((id(x), axis))
        plan.examples[name] = size
        plan.symbols.setdefault(name, set()).add(symbol)

    def static(key, axis, reason):
        plan.static.setdefault(key, {})[axis] = reason

    batch_symbol = None
    if free is not None and batch_leaf is not None and not isinstance(free.shapes[id(batch_leaf)][0], int):
        batch_symbol = free.shapes[id(batch_leaf)][0]
    for x in tensors:
        for axis, size in enumerate(x.shape):
            size = int(size)
            is_batch = axis == 0 and size == batch
            if free is None:  # no discovery: the batch axis by example size, every other axis static
                if is_batch and want_batch:
                    add(BATCH, x, axis, size)
                else:
                    static(id(x), axis, no_batch if is_batch else (NOT_TRIED if not dynamic_tokens else
                                                                   "not tried: the Dim.AUTO discovery capture failed"))
                continue
            expr = free.shapes[id(x)][axis]
            if isinstance(expr, int):
                static(id(x), axis, _small(size) if size <= 1 else FIXED)
            elif not expr.is_Symbol:
                static(id(x), axis, f"tied to other axes as {expr} (not a plain size)")
            elif expr == batch_symbol:
                add(BATCH, x, axis, size, expr) if want_batch else static(id(x), axis, no_batch)
            elif dynamic_tokens:
                add(f"tokens_{size}", x, axis, size, expr)
            else:
                static(id(x), axis, NOT_TRIED)
    if free is not None:
        _drop_guarded(plan, free)
    return plan


def _drop_guarded(plan: _AxisPlan, free: _Discovery) -> None:
    """Judge each token dimension with the discovery capture's guards, its symbols set to :func:`probe_size`:

    * pinned axes become static (DiT: ``hidden_states[2] // 4 == 7``): a guard that fails when one symbol
      alone moves pins that symbol; one that fails only when they move together pins the whole dimension;
    * the rest is split into the smallest sets of symbols that can move on their own, one dimension each
      (``tokens_16``, ``tokens_16_b``): axes of equal example size that the graph lets vary independently (Flux
      with as many image as text tokens) are not tied, while axes it only accepts equal stay together (Flux's
      image tokens and ``img_ids`` rows, related through ``txt + img == len(txt_ids) + len(img_ids)``).
    """
    for name in [n for n in plan.groups if n != BATCH]:  # the batch is judged by the capture itself
        symbols = set(plan.symbols[name]) - {None}
        probe = probe_size(plan.examples[name])
        pinned: dict = {}
        while symbols:
            guard = free.rejects({s: probe for s in symbols})
            if guard is None:
                break
            alone = [s for s in symbols & guard.free_symbols if free.rejects({s: probe}) is not None]
            for s in alone or list(symbols):
                pinned[s] = guard
                symbols.discard(s)
        axes, example = plan.groups.pop(name), plan.examples.pop(name)
        del plan.symbols[name]
        for key, axis in axes:
            symbol = free.shapes[key][axis]
            if symbol in pinned:
                plan.static.setdefault(key, {})[axis] = (
                    f"fixed by the model: the capture with free sizes guards {free.readable(pinned[symbol])}, "
                    f"false at size {probe}")
        for k, part in enumerate(_independent_parts(free, symbols, probe)):
            part_name = name if k == 0 else f"{name}_{chr(ord('a') + k)}"
            plan.groups[part_name] = [(key, axis) for key, axis in axes if free.shapes[key][axis] in part]
            plan.examples[part_name] = example
            plan.symbols[part_name] = set(part)


def _independent_parts(free: _Discovery, symbols: set, probe: int) -> list[set]:
    """``symbols`` split into sets that can move to ``probe`` on their own: one symbol, else the first pair that
    can, else all that remain (in order of appearance in the inputs)."""
    rank = {s: i for i, s in enumerate(free.labels)}
    remaining = sorted(symbols, key=lambda s: rank.get(s, len(rank)))
    parts = []
    while remaining:
        first = remaining[0]
        part = {first} if free.rejects({first: probe}) is None else next(
            ({first, other} for other in remaining[1:] if free.rejects({first: probe, other: probe}) is None),
            set(remaining))
        parts.append(part)
        remaining = [s for s in remaining if s not in part]
    return parts


def _blamed(message: str, names) -> list[str]:
    # torch.export names the dimensions it refuses only in its error message (a UserError of type
    # CONSTRAINT_VIOLATION carries no structured list), so the names are read from the text
    return [n for n in names if re.search(rf"(?<![0-9A-Za-z_]){re.escape(n)}(?![0-9A-Za-z_])", message)]


def _node_shapes(captured) -> dict[str, list]:
    """Node name -> per-axis :func:`_expr` of its tensor value, read right after the capture: later passes that
    compare symbolic sizes add guards (an image-token count equal to a text-token count in the example would be
    unified with it)."""
    return {n.name: [_expr(d) for d in n.meta["val"].shape] for n in captured.graph_module.graph.nodes
            if isinstance(n.meta.get("val"), torch.Tensor)}


def _residual_axes(captured, shapes: dict[str, list], plan: BlockStackPlan,
                   active: dict) -> dict[int, tuple[str, int, int]]:
    """The residual's symbolic axes as (dimension, scale, offset); raises _Refused for the dimensions of an axis
    that is not ``scale * dimension + offset``. ``shapes``: :func:`_node_shapes` of the capture."""
    import sympy

    if not any(active.values()):
        return {}
    placeholders = [n.name for n in captured.graph_module.graph.nodes if n.op == "placeholder"]
    names = {}
    for x, node in zip(captured.example_leaves, placeholders):
        for axis, name in active.get(id(x), {}).items():
            expr = shapes[node][axis]
            if not isinstance(expr, int):
                names[expr] = name
    if plan.body_output not in shapes:
        raise _Refused(sorted(set(names.values())), "the block stack output has no recorded shape")
    out = {}
    for axis, expr in enumerate(shapes[plan.body_output]):
        if isinstance(expr, int):
            continue
        if expr in names:
            out[axis] = (names[expr], 1, 0)
            continue
        symbols = list(expr.free_symbols)
        if len(symbols) == 1 and symbols[0] in names:
            poly = sympy.Poly(expr, symbols[0])
            coeffs = poly.all_coeffs()
            if poly.degree() == 1 and all(c.is_integer for c in coeffs):
                out[axis] = (names[symbols[0]], int(coeffs[0]), int(coeffs[1]))
                continue
        blamed = sorted({names[s] for s in symbols if s in names})
        raise _Refused(blamed, f"the residual's axis {axis} has size {expr}, not a*dimension+b: predict could not "
                               "take it as an input")
    return out


def _where(names_by_id: dict, axes: list[tuple[int, int]]) -> str:
    by_leaf: dict[str, list[int]] = {}
    for key, axis in axes:
        by_leaf.setdefault(names_by_id[key], []).append(axis)
    return ", ".join(f"{name}[{', '.join(map(str, sorted(ax)))}]" for name, ax in by_leaf.items())



def capture_dynamic(
    module: torch.nn.Module,
    kwargs: dict,
    *,
    dynamic_batch: bool = True,
    dynamic_tokens: bool = True,
    block_prefixes: tuple[str, ...] | None = None,
    forward: Callable | None = None,
) -> tuple[CapturedGraph, BlockStackPlan, ShapePlan]:
    """Capture ``module(**kwargs)`` with its batch and token axes symbolic where the model allows them (see the
    module docstring) and locate its block stack. ``forward``: what to trace (see :func:`capture_graph`)."""
    leaves, _ = flatten_call((), kwargs)
    notes: list[str] = []
    batch_leaf = _batch_leaf(kwargs)
    batch = None if batch_leaf is None else int(batch_leaf.shape[0])
    want_batch = dynamic_batch and batch is not None and batch >= 2
    if dynamic_batch and not want_batch:
        notes.append(f"batch axis kept static: the example batch is {batch} (a dynamic batch needs >= 2)")
    free = None
    if dynamic_tokens or want_batch:  # the batch too: which axes torch.export equates with hidden_states'
        try:
            free = _discover_free_axes(module, kwargs, forward)
        except RuntimeError as exc:
            notes.append(f"token axes kept static, batch axes taken by example size: the capture with free "
                         f"sizes (Dim.AUTO) failed ({str(exc)[:300]})")
    axes = _plan_axes(leaves, free, batch_leaf, want_batch, dynamic_tokens, dynamic_batch)
    captured, plan, active, residual_axes, mins = _capture_with_dims(
        module, kwargs, axes, block_prefixes, notes, forward)
    leaves = captured.example_leaves
    names = leaf_names(captured.in_spec, skip_first_key=True)
    position = {id(x): i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)}
    dynamic_axes = {position[k]: dict(sorted(v.items())) for k, v in active.items() if v}
    static_axes = {position[k]: dict(sorted(v.items())) for k, v in axes.static.items() if v}
    used = {n for v in dynamic_axes.values() for n in v.values()}
    dims = {}
    for name in [BATCH, *sorted(n for n in axes.groups if n != BATCH)]:
        if name in used:
            lo, hi = BATCH_RANGE if name == BATCH else (mins[name], None)
            dims[name] = {"example": axes.examples[name], "min": lo, "max": hi}
    batch_leaves = sorted(i for i, v in dynamic_axes.items() if v.get(0) == BATCH)
    _summarise(notes, names, position, axes, dims)
    shapes = ShapePlan(batch_size=batch if batch_leaves else None, batch_leaves=batch_leaves, dims=dims,
                       dynamic_axes=dynamic_axes, static_axes=static_axes, residual_axes=residual_axes, notes=notes)
    return captured, plan, shapes


def _capture_with_dims(module, kwargs, axes: _AxisPlan, block_prefixes, notes: list[str], forward=None):
    """Capture with the planned dimensions, dropping those torch.export refuses (their axes become static)."""
    mins = {name: BATCH_RANGE[0] if name == BATCH else TOKEN_MIN for name in axes.groups}

    def attempt(names):
        dims = {n: torch.export.Dim(n, min=mins[n], max=BATCH_RANGE[1] if n == BATCH else None) for n in names}
        active: dict[int, dict[int, str]] = {}
        for n in names:
            for key, axis in axes.groups[n]:
                active.setdefault(key, {})[axis] = n
        spec = _kwargs_spec(kwargs, {k: {a: dims[n] for a, n in v.items()} for k, v in active.items()})
        try:
            captured = capture_graph(module, (), kwargs, dynamic_shapes=spec, forward=forward)
        except RuntimeError as exc:
            if not names:
                raise
            raise _Refused(_blamed(str(exc), names), str(exc)) from exc
        shapes = _node_shapes(captured)
        plan = locate_block_stack(captured.graph_module, block_prefixes)
        return captured, plan, active, _residual_axes(captured, shapes, plan, active)

    def drop(name, message):
        for key, axis in axes.groups[name]:
            reason = f"refused by torch.export as dimension {name}: {message[:300]}"
            axes.static.setdefault(key, {})[axis] = reason
        if name == BATCH:
            notes.append(f"batch axis kept static: torch.export refused a dynamic batch ({message[:300]})")

    active_names = sorted(axes.groups, key=lambda n: n != BATCH)  # the batch first
    while True:
        try:
            return (*attempt(active_names), mins)
        except _Refused as refused:
            blamed, message = refused.blamed, str(refused)
            if not blamed and len(active_names) == 1:
                blamed = list(active_names)
            if not blamed:
                break
            for name in blamed:
                if name != BATCH and mins[name] < 2 and "to be a constant" not in message:
                    mins[name] = 2  # a guard may exclude size 1 only: try again from 2 before giving up
                else:
                    drop(name, message)
                    active_names.remove(name)
    # a refusal that names no dimension: add them one at a time, the batch first
    accepted: list[str] = []
    result = None
    for name in active_names:
        try:
            result = attempt(accepted + [name])
            accepted.append(name)
        except _Refused as refused:
            drop(name, str(refused))
    if result is None:
        result = attempt([])
    return (*result, mins)


def _summarise(notes: list[str], names: list[str], position: dict, axes: _AxisPlan, dims: dict) -> None:
    names_by_id = {k: names[i] for k, i in position.items()}
    for name in dims:
        if name == BATCH:
            continue
        note = f"dynamic axis {name} (example size {dims[name]['example']}): {_where(names_by_id, axes.groups[name])}"
        if len(axes.symbols[name] - {None}) > 1:
            note += " (tied: the captured graph's guards fail when one of them changes size alone)"
        twins = [n for n in dims if n != name and n != BATCH and dims[n]["example"] == dims[name]["example"]]
        if twins:
            note += f" (same example size as {', '.join(twins)}, kept apart: the graph lets them vary independently)"
        notes.append(note)
    by_reason: dict[str, list[tuple[int, int]]] = {}
    for key, reasons in axes.static.items():
        for axis, reason in reasons.items():
            if reason.startswith(("refused by", "dynamic_batch", "the example batch")):
                continue  # already noted (or a batch axis)
            by_reason.setdefault(reason, []).append((key, axis))
    for reason, where in by_reason.items():
        notes.append(f"static axes {_where(names_by_id, where)}: {reason}")
    for name in axes.groups:
        if name not in dims and name != BATCH:
            notes.append(f"axes {_where(names_by_id, axes.groups[name])} kept static: {name} was refused "
                         "(see static_axes)")



def _resize_axis(t: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    reps = [1] * t.dim()
    reps[axis] = -(-size // t.shape[axis])
    return t.repeat(*reps).narrow(axis, 0, size).clone()


def resize_batch(leaves: list, batch_leaves: list[int], new_batch: int) -> list:
    """The leaves with every batch axis cut or tiled to ``new_batch`` (for checking dynamic-batch exports)."""
    out = list(leaves)
    for i in batch_leaves:
        out[i] = _resize_axis(leaves[i], 0, new_batch)
    return out


def resize_dims(leaves: list, dynamic_axes: dict[int, dict[int, str]], sizes: dict[str, int]) -> list:
    """The leaves with every axis of the named dimensions cut or tiled to ``sizes[name]`` (ids and embeddings
    repeat: such inputs only serve to compare an export with the PyTorch model)."""
    out = list(leaves)
    for i, axes in dynamic_axes.items():
        for axis, name in axes.items():
            if name in sizes:
                out[i] = _resize_axis(out[i], axis, sizes[name])
    return out


