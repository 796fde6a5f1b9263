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


def locate_block_stack(gm: torch.fx.GraphModule, prefixes: tuple[str, ...] | None = None) -> BlockStackPlan:
    """Find the block stack of a captured DiT-family graph.

    An op belongs to block i only if one of its ``nn_module_stack`` paths *ends* at ``<prefix>.<i>`` (DiT calls
    ``transformer_blocks[0].norm1.emb`` after the loop, which a looser rule would swallow). The body is the span
    from the first to the last block op, minus the ops in that span that do not depend on a block op (they stay
    in the head). Its one output crossing to the tail is the body output; the residual input is the body input of
    the same shape produced (through views and casts) by the patch embedder.

    Raises:
        UnsupportedModelError: no block ModuleList was found, or the body has no single hidden-state output or
            no identifiable residual input; the message says what was looked for.
    """
    prefixes = tuple(prefixes or KNOWN_BLOCK_PREFIXES)
    pattern = _block_pattern(prefixes)
    nodes = list(gm.graph.nodes)
    block_ids: set[tuple[str, int]] = set()
    in_block = []
    for i, node in enumerate(nodes):
        hits = [m for m in (pattern.match(p) for p in _stack_paths(node)) if m]
        if hits:
            in_block.append(i)
            block_ids.update((m.group(1), int(m.group(2))) for m in hits)
    if not in_block:
        found = discover_block_prefixes(gm)
        if found and tuple(found) != prefixes and not set(found) <= set(prefixes):
            return locate_block_stack(gm, tuple(found))
        raise UnsupportedModelError(
            f"no transformer-block stack found: looked for ops inside modules named {list(prefixes)}.<index> "
            "(and any ModuleList with two or more entries that have submodules). Pass block_prefixes=(...) "
            "naming your model's block ModuleList(s)."
        )
    first, last = in_block[0], in_block[-1]
    block_set = {nodes[i] for i in in_block}
    body: set[torch.fx.Node] = set()
    for node in nodes[first:last + 1]:
        if node in block_set or any(a in body for a in node.all_input_nodes):
            body.add(node)
    outputs = [n for n in body if any(u not in body for u in n.users)]
    if len(outputs) != 1:
        raise UnsupportedModelError(
            f"the block stack ({', '.join(sorted({p for p, _ in block_ids}))}) has {len(outputs)} outputs used "
            f"after it ({[n.name for n in outputs]}); tcpade_fx needs exactly one hidden-state output."
        )
    out = outputs[0]
    out_shape = _shape(out)
    candidates = []
    for node in body:
        for a in node.all_input_nodes:
            if a not in body and a.op != "get_attr" and _shape(a) == out_shape and a not in candidates:
                candidates.append(a)
    from_embedder = [a for a in candidates if _comes_from_embedder(a)]
    chosen = from_embedder if from_embedder else candidates
    if len(chosen) != 1:
        raise UnsupportedModelError(
            f"cannot tell the block stack's residual input: {len(candidates)} body inputs have the output's shape "
            f"{out_shape} ({[a.name for a in candidates]}), {len(from_embedder)} of them come from a patch embedder "
            f"({list(PATCH_EMBEDDERS)})."
        )
    return BlockStackPlan(
        prefixes=tuple(sorted({p for p, _ in block_ids})),
        num_blocks=len(block_ids),
        body_nodes=frozenset(n.name for n in body),
        body_input=chosen[0].name,
        body_output=out.name,
    )
