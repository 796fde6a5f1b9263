"""Split a flat graph at transformer-block boundaries, for regional (per-block) compilation.

    top = split_regions(gm)            # GraphModule -> GraphModule, same inputs and outputs as gm
    groups = group_regions(top)        # {"transformer_blocks": ["region_1", ...], "single_transformer_blocks": ...}

:func:`split_regions` cuts ``gm``'s ``call_function`` nodes into maximal runs of one block each (the block is read
from the node's ``nn_module_stack``: the innermost ``<ModuleList>.<index>`` path of a block list, as
:mod:`.locate` finds them) and runs of non-block ops (the head, the tail, what sits between block lists). Each run
becomes a submodule ``region_<i>`` of the returned GraphModule, called with everything it reads as inputs: the
weights are lifted out of the region (the top graph keeps the ``get_attr`` nodes, so they are the model's own
tensors, never copies), and symbolic sizes are recomputed inside the region from its tensor inputs (so a region
of a dynamic-shape capture takes tensors only, with the capture's symbolic sizes in its placeholders' ``val``).
A block region's activations are passed through :func:`dense` (a no-op unless a block reads a view), so that every
block of a group sees one layout.

:func:`group_regions` groups the block regions whose graphs are structurally identical (same ops, same argument
structure and constants, same input and output shapes and dtypes): 19 dual-stream + 38 single-stream
Flux blocks are two groups, so a backend compiles one representative per group and calls it with each block's
own weights (:mod:`tcpade_fx.backends.inductor` with ``regional=True``).
"""

from __future__ import annotations

import operator
import re

import torch

from .locate import KNOWN_BLOCK_PREFIXES, _block_lists, _stack_paths

OUTER = None  # the key of non-block runs
REGIONS_META = "tcpade_regions"  # top.meta[...]: [(submodule name, block list name or None), ...] in call order


def _is_sym(node: torch.fx.Node) -> bool:
    return isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool))


def _block_key(node: torch.fx.Node, pattern: re.Pattern, keys: dict) -> tuple[str, int] | None:
    if node.target is operator.getitem and node.args and isinstance(node.args[0], torch.fx.Node):
        return keys.get(node.args[0], OUTER)  # a getitem belongs with the op whose result it unpacks
    key = OUTER
    for path in _stack_paths(node):  # outermost first: the last match is the innermost block
        m = pattern.match(path)
        if m:
            key = (m.group(1), int(m.group(2)))
    return key


def _runs(gm: torch.fx.GraphModule, prefixes: tuple[str, ...]) -> list[tuple[object, list[torch.fx.Node]]]:
    """Maximal runs of ``call_function`` nodes of one block (or of no block), in graph order; symbolic-size nodes
    stay out (each region recomputes those it needs). Any other node (a ``call_module``) ends a run."""
    pattern = re.compile(r"^(?:.*\.)?(" + "|".join(re.escape(p) for p in prefixes) + r")\.(\d+)$")
    runs: list[tuple[object, list[torch.fx.Node]]] = []
    keys: dict = {}
    open_run = False
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        if node.op != "call_function":
            open_run = False
            continue
        if _is_sym(node):
            continue
        key = keys[node] = _block_key(node, pattern, keys)
        if open_run and runs[-1][0] == key:
            runs[-1][1].append(node)
        else:
            runs.append((key, [node]))
            open_run = True
    return runs


def _external_inputs(nodes: list[torch.fx.Node], members: set) -> list[torch.fx.Node]:
    """What ``nodes`` read from outside ``members``, in first-use order; symbolic-size nodes are followed to the
    tensors they are computed from (the region recomputes them)."""
    found: dict[torch.fx.Node, None] = {}
    seen: set = set()

    def visit(n: torch.fx.Node) -> None:
        if n in members or n in seen:
            return
        seen.add(n)
        if _is_sym(n) and n.op == "call_function":
            for a in n.all_input_nodes:
                visit(a)
        else:
            found[n] = None

    for node in nodes:
        for a in node.all_input_nodes:
            visit(a)
    return list(found)


def _region_graph(nodes: list[torch.fx.Node], inputs: list[torch.fx.Node], outputs: list[torch.fx.Node]):
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for i, n in enumerate(inputs):
        p = graph.placeholder(f"in_{i}_{n.name}")
        p.meta = {k: v for k, v in n.meta.items() if k in ("val", "tensor_meta")}
        env[n] = p

    def get(n: torch.fx.Node) -> torch.fx.Node:
        if n not in env:  # a symbolic size computed outside: recompute it here
            env[n] = graph.node_copy(n, get)
        return env[n]

    for node in nodes:
        env[node] = graph.node_copy(node, get)
    graph.output(tuple(env[n] for n in outputs))
    return graph


def split_regions(gm: torch.fx.GraphModule, prefixes: tuple[str, ...] | None = None) -> torch.fx.GraphModule:
    """``gm`` as a top graph calling one submodule per block and per run of non-block ops (see the module doc).

    ``prefixes``: the block ModuleList names (default: those :func:`.locate._block_lists` finds in ``gm``). Same
    inputs and outputs as ``gm``; its parameters are ``gm``'s own tensors (shared, not copied). Without block nodes
    the top graph calls a single region.
    """
    if prefixes is None:
        prefixes = tuple(name for name, _ in _block_lists(gm)) or KNOWN_BLOCK_PREFIXES
    runs = _runs(gm, prefixes)
    member_of = {n: i for i, (_, nodes) in enumerate(runs) for n in nodes}
    inputs = [_external_inputs(nodes, set(nodes)) for _, nodes in runs]
    # a region's outputs: its nodes read by another region, or by the top graph (output, call_module, sym sizes)
    wanted: set[torch.fx.Node] = {n for ins in inputs for n in ins}
    top_readers = [n for n in gm.graph.nodes if n not in member_of and n.op not in ("placeholder", "get_attr")]
    wanted |= set(_external_inputs(top_readers, set()))
    outputs = [[n for n in nodes if n in wanted] for _, nodes in runs]
    _align_outputs(runs, inputs, outputs)

    top = torch.fx.Graph()
    top._codegen = torch.fx.graph.CodeGen()
    root: dict[str, object] = {}
    env: dict[torch.fx.Node, torch.fx.Node] = {}

    def get(n: torch.fx.Node) -> torch.fx.Node:
        if n not in env:  # a symbolic size the top graph reads: computed where it is needed
            env[n] = top.node_copy(n, get)
        return env[n]

    for node in gm.graph.nodes:  # inputs and weights first: every region may read any of them
        if node.op in ("placeholder", "get_attr"):
            env[node] = top.node_copy(node, get)
            if node.op == "get_attr":
                root[node.target] = _attr(gm, node.target)
    regions_meta = []
    emitted: set[int] = set()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        i = member_of.get(node)
        if i is None:
            if not (node.op == "call_function" and _is_sym(node)):
                env[node] = top.node_copy(node, get)
                if node.op == "call_module":
                    root[node.target] = gm.get_submodule(node.target)
            continue
        if i in emitted:
            continue
        emitted.add(i)
        key, nodes = runs[i]
        name = f"region_{i}"
        sub = torch.fx.GraphModule(torch.nn.Module(), _region_graph(nodes, inputs[i], outputs[i]),
                                   class_name="TCPadeRegion")
        root[name] = sub
        regions_meta.append((name, key[0] if key is not OUTER else None))
        args = [get(n) for n in inputs[i]]
        if key is not OUTER:  # the same layout into every block of a group (one compile, no stride recompile)
            args = [_contiguous(top, a) if n.op != "get_attr" and isinstance(n.meta.get("val"), torch.Tensor)
                    else a for n, a in zip(inputs[i], args)]
        call = top.call_module(name, tuple(args))
        call.meta["val"] = tuple(n.meta.get("val") for n in outputs[i])
        for j, out in enumerate(outputs[i]):
            item = top.call_function(operator.getitem, (call, j))
            item.meta = {k: v for k, v in out.meta.items() if k in ("val", "tensor_meta")}
            env[out] = item
    out_gm = torch.fx.GraphModule(root, top, class_name=type(gm).__name__ + "Regions")
    out_gm.meta[REGIONS_META] = regions_meta
    out_gm.graph.lint()
    return out_gm


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` with row-major strides, also along size-1 axes (where ``.contiguous()`` leaves a view's strides and
    the compiler's stride guards would still see a difference): ``t`` itself when it has them, else a copy."""
    stride, expected = t.stride(), 1
    for d in range(t.dim() - 1, -1, -1):
        if stride[d] != expected:
            return t.clone(memory_format=torch.contiguous_format)
        expected *= t.shape[d]
    return t


def _contiguous(graph: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node:
    """``dense(node)`` in ``graph``: no copy where it already is (the usual case), one where a block reads a view
    (the first single-stream Flux block reads a slice of the last dual-stream block's output)."""
    out = graph.call_function(dense, (node,))
    out.meta = {k: v for k, v in node.meta.items() if k == "val"}
    return out


def _align_outputs(runs, inputs, outputs) -> None:
    """Blocks of one list that differ only in what the graph reads from them (the last block's text stream is
    not needed after it) return the union of their outputs, so that one compiled graph serves them all."""
    positions: dict[tuple, set[int]] = {}
    keys = []
    for (key, nodes), ins, outs in zip(runs, inputs, outputs):
        if key is OUTER:
            keys.append(None)
            continue
        graph = _region_graph(nodes, ins, [])
        k = (key[0], structure(torch.fx.GraphModule(torch.nn.Module(), graph))[:-1])
        keys.append(k)
        index = {n: i for i, n in enumerate(nodes)}
        positions.setdefault(k, set()).update(index[n] for n in outs)
    for i, k in enumerate(keys):
        if k is not None:
            outputs[i] = [runs[i][1][j] for j in sorted(positions[k])]


def _attr(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _describe(x, index: dict) -> object:
    if isinstance(x, torch.fx.Node):
        return ("node", index[x])
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(_describe(y, index) for y in x))
    if isinstance(x, dict):
        return ("dict", tuple((k, _describe(v, index)) for k, v in x.items()))
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("sym", str(x))
    return (type(x).__name__, repr(x))


def _value(node: torch.fx.Node) -> object:
    v = node.meta.get("val")
    if isinstance(v, (list, tuple)):
        return tuple(_value_of(x) for x in v)
    return _value_of(v)


def _value_of(v) -> object:
    # not the strides: the capture's are not the runtime's (a region's input may be a view in the capture and a
    # fresh tensor at run time); where they differ the compiler's guards recompile, and that is counted
    if isinstance(v, torch.Tensor):
        return ("tensor", str(v.dtype), str(tuple(v.shape)), str(v.device))
    return (type(v).__name__, str(v))


def structure(region: torch.fx.GraphModule) -> tuple:
    """A hashable description of ``region``'s graph: every node's op, target, argument structure (nodes by
    position, constants by value) and value (shape, dtype, device; not the strides). Equal for two regions exactly when one
    compiled graph serves both (given each one's own inputs)."""
    index: dict[torch.fx.Node, int] = {}
    parts = []
    for i, node in enumerate(region.graph.nodes):
        index[node] = i
        target = node.target if node.op != "placeholder" else None
        parts.append((node.op, str(target), _describe(node.args, index), _describe(node.kwargs, index),
                      _value(node)))
    return tuple(parts)


def group_regions(top: torch.fx.GraphModule) -> list[tuple[str, list[str]]]:
    """The block regions of ``top`` (from :func:`split_regions`) grouped by :func:`structure`, and each non-block
    region alone: ``[(group name, [submodule names]), ...]`` in first-call order. A block list whose blocks all
    match is one group named after it (``"transformer_blocks"``); a list with several structures gets ``#1``,
    ``#2`` ... suffixes; non-block regions are ``"head"``, ``"tail"`` or ``"outer<i>"``."""
    regions = top.meta[REGIONS_META]
    groups: dict[object, list[str]] = {}
    labels: dict[object, str] = {}
    per_list: dict[str, int] = {}
    outer = [name for name, block in regions if block is None]
    for name, block in regions:
        if block is None:
            key = ("outer", name)
            k = outer.index(name)
            label = "head" if k == 0 and regions[0][0] == name else "tail" if regions[-1][0] == name else f"outer{k}"
        else:
            key = ("block", block, structure(getattr(top, name)))
            label = None
        if key not in groups:
            groups[key] = []
            if label is None:
                per_list[block] = per_list.get(block, 0) + 1
                label = block if per_list[block] == 1 else f"{block}#{per_list[block]}"
            labels[key] = label
        groups[key].append(name)
    return [(labels[k], names) for k, names in groups.items()]
