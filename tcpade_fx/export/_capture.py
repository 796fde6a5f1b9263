"""Shared by the exporters: record one transformer call, capture it with a symbolic batch axis, rewrite it.

The result, :class:`ExportCapture`, holds the two GraphModules the runtime switches between (``compute`` and
``predict``, see :mod:`tcpade_fx.passes.rewrite`), the example leaves, their names, which leaves are tensors and
which are constants specialised in the graphs, and the batch axes.
"""

from __future__ import annotations

import hashlib
import inspect
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..api import _transformer_of
from ..passes import (
    BlockStackPlan,
    build_compute_graph,
    build_predict_graph,
    capture_graph,
    flatten_call,
    locate_block_stack,
    split_head_body_tail,
    verify_rewrite,
    verify_split,
)

BATCH = "batch"
#: JSON-representable constant leaves (specialised in the graph, checked at every new call signature).
CONSTANT_TYPES = (bool, int, float, str, type(None))


class _Recorded(Exception):
    pass


@dataclass
class ExportCapture:
    module: torch.nn.Module
    kwargs: dict
    compute: torch.fx.GraphModule
    predict: torch.fx.GraphModule
    plan: BlockStackPlan
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    leaves: list
    leaf_names: list[str]
    output_names: list[str]
    tensor_positions: list[int]
    timestep_position: int
    batch_size: int | None
    batch_leaves: list[int]  # leaf positions whose axis 0 is the symbolic batch
    residual: torch.Tensor
    notes: list[str] = field(default_factory=list)

    @property
    def tensor_names(self) -> list[str]:
        return [self.leaf_names[i] for i in self.tensor_positions]


# -- the example call ---------------------------------------------------------------------------------------
def _is_mnist_pipeline(target) -> bool:
    from ..models.mnist import _MNISTFlowPipeline

    return isinstance(target, _MNISTFlowPipeline)


def bind_call(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    """Keyword arguments of ``module.forward`` in signature order (as :class:`TCPadeRuntime` binds them)."""
    signature = inspect.signature(type(module).forward)
    bound = signature.bind(module, *args, **kwargs)
    named = dict(bound.arguments)
    named.pop(next(iter(signature.parameters)))
    for name, p in signature.parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD and name in named:
            named.update(named.pop(name))
    return named


def record_call(target, example_call) -> tuple[torch.nn.Module, dict]:
    """The transformer and the keyword arguments of its first call.

    ``example_call`` for a pipeline: a dict of pipeline keyword arguments (the pipeline is run until its first
    transformer call, which is recorded and aborted). For a transformer: a dict of its keyword arguments or an
    ``(args, kwargs)`` pair. ``None`` works for the bundled MNIST pipelines (two labels, CFG: batch 4).
    """
    transformer = _transformer_of(target)
    if target is transformer:
        if example_call is None:
            raise TypeError("exporting a bare transformer needs example_call=<its keyword arguments>")
        if isinstance(example_call, tuple) and len(example_call) == 2 and isinstance(example_call[1], dict):
            args, kwargs = example_call
        elif isinstance(example_call, dict):
            args, kwargs = (), example_call
        else:
            raise TypeError("example_call for a transformer must be a dict of kwargs or an (args, kwargs) pair")
        return transformer, bind_call(transformer, tuple(args), dict(kwargs))
    if example_call is None:
        if not _is_mnist_pipeline(target):
            raise TypeError(
                f"exporting a {type(target).__name__} needs example_call=<pipeline keyword arguments> (e.g. "
                "dict(prompt='...', num_inference_steps=2, height=..., width=...)): the transformer call it makes "
                "first fixes the exported shapes; use batch >= 2 so that the batch axis can stay dynamic"
            )
        example_call = {"class_labels": [0, 1], "num_inference_steps": 2}
    recorded: dict = {}
    installed = transformer.__dict__.get("forward")

    def record(*args, **kwargs):
        recorded["call"] = (args, kwargs)
        raise _Recorded

    transformer.forward = record
    try:
        target(**example_call)
    except _Recorded:
        pass
    finally:
        if installed is None:
            transformer.__dict__.pop("forward", None)
        else:
            transformer.forward = installed
    if "call" not in recorded:
        raise RuntimeError(f"{type(target).__name__}(**example_call) finished without calling its transformer")
    args, kwargs = recorded["call"]
    return transformer, bind_call(transformer, args, kwargs)


# -- names and hashes ---------------------------------------------------------------------------------------
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


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over the sorted state_dict: for each entry its name, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- capture ------------------------------------------------------------------------------------------------
def _batch_dim():
    return torch.export.Dim(BATCH, min=1, max=4096)


def _dynamic_spec(kwargs: dict, batch_size: int | None, dim) -> Any:
    def spec(x):
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == batch_size:
            return {0: dim}
        return None

    return {k: pytree.tree_map(spec, v) if not isinstance(v, torch.Tensor) else spec(v) for k, v in kwargs.items()}


def _batch_size(kwargs: dict) -> int | None:
    hs = kwargs.get("hidden_states")
    if isinstance(hs, torch.Tensor) and hs.dim() >= 1:
        return int(hs.shape[0])
    for leaf in pytree.tree_leaves(kwargs):
        if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1:
            return int(leaf.shape[0])
    return None


def capture_for_export(
    target, example_call=None, *, dynamic_batch: bool = True, block_prefixes: tuple[str, ...] | None = None
) -> ExportCapture:
    """Record the transformer's first call, capture it (batch axis symbolic when the model allows), locate the
    block stack, build and verify the compute/predict graphs on the example inputs."""
    module, kwargs = record_call(target, example_call)
    if "timestep" not in kwargs or not isinstance(kwargs["timestep"], torch.Tensor):
        raise TypeError(f"{type(module).__name__} was called without a tensor `timestep`; tcpade_fx needs it")
    # distinct tensors: torch.export silently aliases inputs given as the same object
    kwargs = pytree.tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, kwargs)
    leaves, _ = flatten_call((), kwargs)
    bad = [type(x).__name__ for x in leaves if not isinstance(x, (torch.Tensor, *CONSTANT_TYPES))]
    if bad:
        raise TypeError(f"cannot export call arguments of type {sorted(set(bad))}: only tensors and JSON constants")
    notes: list[str] = []
    batch = _batch_size(kwargs)
    forward = module.__dict__.pop("forward", None)  # capture the original forward, not an installed runtime
    try:
        captured = None
        if dynamic_batch and batch is not None and batch >= 2:
            try:
                captured = capture_graph(module, (), kwargs, dynamic_shapes=_dynamic_spec(kwargs, batch, _batch_dim()))
            except RuntimeError as exc:
                notes.append(f"batch axis kept static: torch.export refused a dynamic batch ({str(exc)[:300]})")
        elif dynamic_batch:
            notes.append(f"batch axis kept static: the example batch is {batch} (a dynamic batch needs >= 2)")
        if captured is None:
            captured = capture_graph(module, (), kwargs)
            batch_leaves: list[int] = []
        else:
            batch_leaves = [
                i for i, x in enumerate(captured.example_leaves)
                if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == batch
            ]
    finally:
        if forward is not None:
            module.forward = forward
    gm = captured.graph_module
    plan = locate_block_stack(gm, block_prefixes)
    compute, predict = build_compute_graph(gm, plan), build_predict_graph(gm, plan)
    leaves = captured.example_leaves
    verify_split(gm, split_head_body_tail(gm, plan), leaves)
    verify_rewrite(gm, compute, predict, leaves, plan)
    with torch.no_grad():
        *outs, residual = compute(*leaves)
    from ..runtime import _leaf_index_of

    names = leaf_names(captured.in_spec, skip_first_key=True)
    return ExportCapture(
        module=module,
        kwargs=kwargs,
        compute=compute,
        predict=predict,
        plan=plan,
        in_spec=captured.in_spec,
        out_spec=captured.out_spec,
        leaves=list(leaves),
        leaf_names=names,
        output_names=leaf_names(captured.out_spec),
        tensor_positions=[i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)],
        timestep_position=_leaf_index_of(kwargs, "timestep", captured.in_spec),
        batch_size=batch if batch_leaves else None,
        batch_leaves=batch_leaves,
        residual=residual,
        notes=notes,
    )


class TensorOnly(torch.nn.Module):
    """``graph(*leaves)`` as a module of the tensor leaves only (constants are baked in), for clean exports."""

    def __init__(self, graph: torch.fx.GraphModule, leaves: list, tensor_positions: list[int], extra: int = 0):
        super().__init__()
        self.inner = graph
        self.constants = [None if i in tensor_positions else x for i, x in enumerate(leaves)]
        self.tensor_positions = list(tensor_positions)
        self.extra = extra  # trailing tensor inputs beyond the call leaves (predict: the residual)

    def forward(self, *tensors):
        full = list(self.constants)
        for pos, t in zip(self.tensor_positions, tensors):
            full[pos] = t
        full += list(tensors[len(self.tensor_positions):])
        return tuple(self.inner(*full))


def resize_batch(leaves: list, batch_leaves: list[int], new_batch: int) -> list:
    """The leaves with every batch axis cut or tiled to ``new_batch`` (for checking dynamic-batch exports)."""
    out = list(leaves)
    for i in batch_leaves:
        t = leaves[i]
        reps = -(-new_batch // t.shape[0])
        out[i] = t.repeat(reps, *([1] * (t.dim() - 1)))[:new_batch].clone()
    return out
