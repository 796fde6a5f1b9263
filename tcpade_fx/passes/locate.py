"""Locate the transformer-block stack (the body) in a captured graph."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

#: Block ModuleList names of the supported families: DiT/PixArt/SD3/Flux ``transformer_blocks``,
#: Flux ``single_transformer_blocks``, Wan ``blocks``.
KNOWN_BLOCK_PREFIXES: tuple[str, ...] = ("transformer_blocks", "single_transformer_blocks", "blocks")
#: Submodules whose output is the token sequence entering the blocks.
PATCH_EMBEDDERS: tuple[str, ...] = ("x_embedder", "pos_embed", "patch_embedding", "proj_in", "patch_embed", "img_in")
_PASS_THROUGH = {
    "view", "reshape", "_unsafe_view", "transpose", "permute", "flatten", "unflatten", "contiguous", "clone",
    "to", "_to_copy", "type_as", "unsqueeze", "squeeze", "alias", "detach", "expand",
}


@dataclass(frozen=True)
class BlockStackPlan:
    """Where the block stack sits: the body's node names, its residual input and its output."""

    prefixes: tuple[str, ...]
    num_blocks: int
    body_nodes: frozenset[str]
    body_input: str
    body_output: str


class UnsupportedModelError(ValueError):
    """The graph has no block stack that tcpade_fx can replace."""


def _stack_paths(node: torch.fx.Node) -> list[str]:
    return [entry[0] for entry in (node.meta.get("nn_module_stack") or {}).values()]


def _block_pattern(prefixes: tuple[str, ...]) -> re.Pattern:
    return re.compile(r"^(?:.*\.)?(" + "|".join(re.escape(p) for p in prefixes) + r")\.(\d+)$")


def discover_block_prefixes(gm: torch.fx.GraphModule) -> tuple[str, ...]:
    """Generic fallback: ModuleList names that appear as ``<name>.<index>`` with at least two indices whose
    entries are blocks, i.e. have submodules of their own (an ``nn.Sequential`` of Linear/activation layers is
    an MLP, not a block stack)."""
    seen: dict[str, set[int]] = {}
    paths = {path for node in gm.graph.nodes for path in _stack_paths(node)}
    for path in paths:
        m = re.match(r"^(?:.*\.)?([A-Za-z_][\w]*)\.(\d+)$", path)
        if m and "." not in path.split(m.group(1))[0].strip("."):
            if any(other.startswith(path + ".") for other in paths):
                seen.setdefault(m.group(1), set()).add(int(m.group(2)))
    return tuple(sorted(name for name, idx in seen.items() if len(idx) >= 2))


def _target_name(node: torch.fx.Node) -> str:
    t = node.target
    name = getattr(t, "__name__", str(t))
    return name.split(".")[0]


def _comes_from_embedder(node: torch.fx.Node) -> bool:
    for _ in range(16):
        if any(any(e in path.split(".") for e in PATCH_EMBEDDERS) for path in _stack_paths(node)):
            return True
        if node.op != "call_function" or _target_name(node) not in _PASS_THROUGH:
            return False
        inputs = [a for a in node.all_input_nodes if a.op != "get_attr"]
        if not inputs:
            return False
        node = inputs[0]
    return False


def _shape(node: torch.fx.Node):
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _same_shape(a, b) -> bool:
    """Shapes equal for every size the axes may take (symbolic sizes compared without adding guards)."""
    if a is None or b is None or len(a) != len(b):
        return False
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return all(x == y if isinstance(x, int) and isinstance(y, int) else statically_known_true(x == y)
               for x, y in zip(a, b))


def _is_tensor(node: torch.fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


#: Ops through which the body output may still be narrowed to the residual stream (a joint text+image sequence
#: sliced back to its image tokens after the last block).
_NARROWING = _PASS_THROUGH | {"slice", "narrow", "select", "getitem", "split", "split_with_sizes", "chunk",
                              "unbind", "tensor_split"}
_NARROWING = _NARROWING | {f"{n}_copy" for n in _NARROWING}  # functionalised graphs (the real-tensor route)
#: Ops that take a part of a tensor: a context-parallel split hook on the first block (diffusers' Wan plan shards
#: ``hidden_states`` in ``blocks.0``'s pre-forward) runs one of them inside that block.
_SPLITTING = {"chunk", "split", "split_with_sizes", "tensor_split", "narrow", "slice", "unbind"}
_SPLITTING = _SPLITTING | {f"{n}_copy" for n in _SPLITTING}


def _block_lists(gm: torch.fx.GraphModule) -> list[tuple[str, int]]:
    """The block ModuleLists the graph runs, ``(name, number of blocks run)``, in the order they start: those of
    the known families and any other found by :func:`discover_block_prefixes`."""
    names = set(discover_block_prefixes(gm))
    pattern = _block_pattern(KNOWN_BLOCK_PREFIXES + tuple(sorted(names)))
    first: dict[str, int] = {}
    blocks: dict[str, set[int]] = {}
    for i, node in enumerate(gm.graph.nodes):
        for m in (pattern.match(p) for p in _stack_paths(node)):
            if m:
                first.setdefault(m.group(1), i)
                blocks.setdefault(m.group(1), set()).add(int(m.group(2)))
    return [(name, len(blocks[name])) for name in sorted(first, key=first.get)]


def _depends_on(nodes: list[torch.fx.Node], source: torch.fx.Node) -> set[torch.fx.Node]:
    """The nodes of ``nodes`` (in graph order) that read ``source``, directly or through each other."""
    reached: set[torch.fx.Node] = set()
    for node in nodes:
        if any(a is source or a in reached for a in node.all_input_nodes):
            reached.add(node)
    return reached


def _crossing(body: set[torch.fx.Node], order: list[torch.fx.Node]) -> list[torch.fx.Node]:
    """The body's nodes (in graph order) read outside it."""
    return [n for n in order if n in body and any(u not in body for u in n.users)]


def _narrowing_chain(out: torch.fx.Node, limit: int = 8) -> list[torch.fx.Node]:
    """``out`` and the ops after it that only narrow or reshape it (each the single live user of the previous):
    where the tail reads the residual stream from the body output."""
    chain = [out]
    for _ in range(limit):
        users = list(chain[-1].users)
        if len(users) != 1:
            break
        user = users[0]
        inputs = [a for a in user.all_input_nodes if a.op != "get_attr" and _is_tensor(a)]  # sizes aside
        if user.op != "call_function" or _target_name(user) not in _NARROWING or inputs != [chain[-1]]:
            break
        chain.append(user)
    return chain


def locate_block_stack(gm: torch.fx.GraphModule, prefixes: tuple[str, ...] | None = None) -> BlockStackPlan:
    """Find the block stack of a captured DiT-family graph.

    An op belongs to block i only if one of its ``nn_module_stack`` paths *ends* at ``<prefix>.<i>`` (DiT calls
    ``transformer_blocks[0].norm1.emb`` after the loop, which a looser rule would swallow). The body is the span
    from the first to the last block op, minus the ops in that span that do not depend on a block op (they stay
    in the head). Its one output crossing to the tail is the body output; the residual input is the body input of
    the same shape produced (through views and casts) by the patch embedder.

    Beyond the five families (``prefixes`` not given): every block ModuleList the graph runs is found (those named
    in :data:`KNOWN_BLOCK_PREFIXES` and those :func:`discover_block_prefixes` finds), and each run of consecutive
    ones is tried as the stack: the plan whose body holds the most blocks wins (the later stack on a tie), so
    context/refiner blocks before the main stack join it where the result is one residual stack and are left in
    the head where they are not. Within a span, long skip connections (a block's output also read by a later
    block, HunyuanDiT's U-shaped skips) stay inside the body; where ops of the span that do not depend on the
    residual input are also read after it (a conditioning tensor the tail shares), they move to the head; where
    the tail only narrows the body output (a joint text+image sequence sliced back to its image tokens), the
    narrowing joins the body.

    Raises:
        UnsupportedModelError: no block ModuleList was found, or the body has no single hidden-state output or
            no identifiable residual input; the message says what was looked for.
    """
    if prefixes:
        return _locate(gm, tuple(prefixes))
    lists = _block_lists(gm)
    if not lists:
        raise UnsupportedModelError(
            f"no transformer-block stack found: looked for ops inside modules named {list(KNOWN_BLOCK_PREFIXES)}"
            ".<index> (and any ModuleList with two or more entries that have submodules). Pass "
            "block_prefixes=(...) naming your model's block ModuleList(s)."
        )
    runs = [tuple(name for name, _ in lists[i:j]) for i in range(len(lists)) for j in range(len(lists), i, -1)]
    plans, errors = [], []
    for k, run in enumerate(runs):
        try:
            plan = _locate(gm, run)
        except UnsupportedModelError as exc:
            errors.append((run, exc))
            continue
        plans.append((plan.num_blocks, k == 0, max(map([n for n, _ in lists].index, run)), plan))
    if plans:
        return max(plans, key=lambda p: p[:3])[3]
    if len(runs) == 1:
        raise errors[0][1]
    tried = "; ".join(f"{list(run)}: {exc}" for run, exc in errors)
    raise UnsupportedModelError(
        f"no run of the block ModuleLists {[n for n, _ in lists]} is one residual stack ({tried}). Pass "
        "block_prefixes=(...) naming the block ModuleList(s) to cache."
    )


def _locate(gm: torch.fx.GraphModule, prefixes: tuple[str, ...]) -> BlockStackPlan:
    pattern = _block_pattern(prefixes)
    nodes = list(gm.graph.nodes)
    block_of: dict[torch.fx.Node, set[tuple[str, int]]] = {}
    in_block = []
    for i, node in enumerate(nodes):
        hits = [m for m in (pattern.match(p) for p in _stack_paths(node)) if m]
        if hits:
            in_block.append(i)
            block_of[node] = {(m.group(1), int(m.group(2))) for m in hits}
    if not in_block:
        raise UnsupportedModelError(
            f"no transformer-block stack found: looked for ops inside modules named {list(prefixes)}.<index> "
            "(and any ModuleList with two or more entries that have submodules). Pass block_prefixes=(...) "
            "naming your model's block ModuleList(s)."
        )
    first, last = in_block[0], in_block[-1]
    span = nodes[first:last + 1]
    try:
        return _plan(span, block_of, leading=set())
    except UnsupportedModelError as exc:
        leading = _leading_splits(span, block_of)
        if not leading:
            raise
        try:
            return _plan(span, block_of, leading)
        except UnsupportedModelError:
            raise exc from None


def _leading_splits(span: list[torch.fx.Node], block_of: dict) -> set[torch.fx.Node]:
    """Block ops that only take a part of a tensor computed before the blocks (and the ``getitem`` of their
    parts): a context-parallel input split at the start of the first block. With them in the head, the residual
    input is the process's own chunk, the shape of the body output."""
    leading: set[torch.fx.Node] = set()
    for node in span:
        if node not in block_of or node.op != "call_function":
            continue
        inputs = [a for a in node.all_input_nodes if a.op != "get_attr"]
        if _target_name(node) == "getitem":
            if inputs and all(a in leading for a in inputs):
                leading.add(node)
        elif _target_name(node) in _SPLITTING and inputs and all(a not in block_of for a in inputs):
            leading.add(node)
    return leading


def _plan(span: list[torch.fx.Node], block_of: dict, leading: set[torch.fx.Node]) -> BlockStackPlan:
    """The plan of the span's body (the block ops, without ``leading``, and what depends on them)."""
    body0: set[torch.fx.Node] = set()
    for node in span:
        if node not in leading and (node in block_of or any(a in body0 for a in node.all_input_nodes)):
            body0.add(node)
    inputs: list[torch.fx.Node] = []
    for node in span:
        if node in body0:
            for a in node.all_input_nodes:
                if a not in body0 and a.op != "get_attr" and _shape(a) is not None and a not in inputs:
                    inputs.append(a)

    def plan_for(h_in: torch.fx.Node):
        """(body, output) with ``h_in`` as the residual input, or None. The span's body first; if that does not
        have one output of ``h_in``'s shape, the ops of it that do not depend on ``h_in`` move to the head."""
        tried = []
        for body in (body0, _depends_on(span, h_in)):
            if not body or body in tried or not any(h_in in n.all_input_nodes for n in body):
                continue
            tried.append(body)
            crossing = _crossing(body, span)
            if len(crossing) != 1:
                continue
            chain = _narrowing_chain(crossing[0])
            for k, node in enumerate(chain):
                if _same_shape(_shape(node), _shape(h_in)):
                    return body | set(chain[1:k + 1]), node
        return None

    found = [(a, plan) for a in inputs for plan in [plan_for(a)] if plan is not None]
    from_embedder = [f for f in found if _comes_from_embedder(f[0])]
    chosen = from_embedder if from_embedder else found
    if len(chosen) != 1:
        crossing = _crossing(body0, span)
        names = sorted({p for ids in block_of.values() for p, _ in ids})
        if not found and len(crossing) != 1:
            raise UnsupportedModelError(
                f"the block stack ({', '.join(names)}) has {len(crossing)} outputs used after it "
                f"({[n.name for n in crossing]}); tcpade_fx needs exactly one hidden-state output."
            )
        shape = _shape(crossing[0]) if len(crossing) == 1 else None
        candidates = [a for a, _ in found] or [a for a in inputs if _same_shape(_shape(a), shape)]
        raise UnsupportedModelError(
            f"cannot tell the block stack's residual input: {len(candidates)} body inputs have the output's shape "
            f"{shape} ({[a.name for a in candidates]}), {len(from_embedder)} of them come from a patch embedder "
            f"({list(PATCH_EMBEDDERS)})."
        )
    h_in, (body, out) = chosen[0]
    blocks = {b for n in body if n in block_of for b in block_of[n]}
    return BlockStackPlan(
        prefixes=tuple(sorted({p for p, _ in blocks})),
        num_blocks=len(blocks),
        body_nodes=frozenset(n.name for n in body),
        body_input=h_in.name,
        body_output=out.name,
    )
