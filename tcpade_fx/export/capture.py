"""What the exporters capture: the transformer's first call, recorded from the pipeline, built into graphs with
symbolic batch and token axes (:func:`tcpade_fx.passes.build_graphs` with ``dynamic=True``).

:class:`ExportCapture` holds the module and its :class:`~tcpade_fx.passes.Graphs`; the exporters and the manifest
read the graphs, the example leaves, their names, which leaves are tensors and which are constants specialised in
the graphs, which axes are dynamic (and why the others are static), and the tensors each graph takes and returns
beyond the call (:meth:`ExportCapture.extra_io`: the residual, and with ``Policy.input_gate`` the block stack's
input and the gate's terms).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..distributed import context_parallel_config
from ..integration import transformer_of
from ..passes import Graphs, ShapePlan, bind_call, build_graphs, example_residual, flatten_call
from ..passes.capture import tracing_forward
from ..passes.verify import neutral_gate

#: JSON-representable constant leaves (specialised in the graph, checked at every new call signature).
CONSTANT_TYPES = (bool, int, float, str, type(None))
#: Names of the graphs' tensors beyond the call: the residual (compute's last output, predict's first extra input),
#: and with ``Policy.input_gate`` the block stack's input (compute's output after the residual) and the gate's
#: terms (predict's input after the residual).
RESIDUAL = "tcpade_residual"
STACK_INPUT = "tcpade_stack_input"
GATE = "tcpade_input_gate"


class _Recorded(Exception):
    pass


@dataclass
class ExportCapture:
    """The transformer and the graphs built from its recorded first call, as the exporters read them."""

    module: torch.nn.Module
    graphs: Graphs

    @property
    def shapes(self) -> ShapePlan:
        return self.graphs.shapes

    plan = property(lambda self: self.graphs.plan)
    compute = property(lambda self: self.graphs.compute)
    predict = property(lambda self: self.graphs.predict)
    in_spec = property(lambda self: self.graphs.in_spec)
    out_spec = property(lambda self: self.graphs.out_spec)
    leaves = property(lambda self: self.graphs.leaves)
    leaf_names = property(lambda self: self.graphs.leaf_names)
    output_names = property(lambda self: self.graphs.output_names)
    tensor_positions = property(lambda self: self.graphs.tensor_positions)
    tensor_names = property(lambda self: self.graphs.tensor_names)
    timestep_position = property(lambda self: self.graphs.timestep_position)
    notes = property(lambda self: self.graphs.notes)
    residual = property(lambda self: example_residual(self.graphs))
    batch_size = property(lambda self: self.shapes.batch_size)
    batch_leaves = property(lambda self: self.shapes.batch_leaves)
    dims = property(lambda self: self.shapes.dims)
    dynamic_axes = property(lambda self: self.shapes.dynamic_axes)
    static_axes = property(lambda self: self.shapes.static_axes)
    residual_axes = property(lambda self: self.shapes.residual_axes)
    token_dims = property(lambda self: self.shapes.token_dims)

    input_gate = property(lambda self: self.graphs.input_gate)

    def export_dims(self) -> dict:
        return self.shapes.export_dims()

    def dynamic_shapes(self, dims: dict, residual: bool = False, gate: bool = False) -> tuple | None:
        """``dynamic_shapes`` for a :class:`~tcpade_fx.backends.TensorOnly` wrapper of a graph."""
        return self.shapes.dynamic_shapes(dims, self.tensor_positions, residual, gate)

    def extra_io(self, which: str) -> tuple[list[torch.Tensor], list[str], list[str]]:
        """What graph ``which`` ("compute" or "predict") takes and returns beyond the call: example tensors of its
        extra inputs, their names, and the names of its extra outputs. compute returns the residual (and the
        stack input with the input gate); predict takes the residual (and the gate's terms, here neutral ones:
        the example only fixes their shape)."""
        if which == "compute":
            return [], [], [RESIDUAL, *([STACK_INPUT] if self.input_gate else [])]
        if which == "predict":
            residual = self.residual
            tensors = [residual, *([neutral_gate(residual)] if self.input_gate else [])]
            return tensors, [RESIDUAL, *([GATE] if self.input_gate else [])], []
        raise ValueError(f"no graph {which!r}: the exports hold 'compute' and 'predict'")


def record_call(target, example_call) -> tuple[torch.nn.Module, dict]:
    """The transformer and the keyword arguments of its first call.

    ``example_call`` for a pipeline: a dict of pipeline keyword arguments (the pipeline is run until its first
    transformer call, which is recorded and aborted); ``None`` takes the pipeline's ``default_example_call`` where
    it defines one (the bundled pipelines do). For a transformer: a dict of its keyword arguments or an
    ``(args, kwargs)`` pair.
    """
    transformer = transformer_of(target)
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
        example_call = getattr(target, "default_example_call", None)
        if example_call is None:
            raise TypeError(
                f"exporting a {type(target).__name__} needs example_call=<pipeline keyword arguments> (e.g. "
                "dict(prompt='...', num_inference_steps=2, height=..., width=...)): the transformer call it makes "
                "first fixes the exported shapes; use batch >= 2 so that the batch axis can stay dynamic"
            )
    recorded: dict = {}

    def record(*args, **kwargs):
        recorded["call"] = (args, kwargs)
        raise _Recorded

    try:
        with tracing_forward(transformer, record):
            target(**dict(example_call))
    except _Recorded:
        pass
    if "call" not in recorded:
        raise RuntimeError(f"{type(target).__name__}(**example_call) finished without calling its transformer")
    args, kwargs = recorded["call"]
    return transformer, bind_call(transformer, args, kwargs)


def refuse_parallel(module: torch.nn.Module) -> None:
    """Refuse to export a transformer with diffusers' context parallelism enabled: its graphs hold each process's
    own chunk of the tokens and the collectives (all-to-all, all-gather) that join them, so they differ per
    process and need the process group at run time, which an ONNX or TensorRT file cannot carry."""
    from ..distributed import UnsupportedParallelismError

    if context_parallel_config(module) is not None:
        raise UnsupportedParallelismError(
            f"{type(module).__name__} has context parallelism enabled (enable_parallelism): its graphs contain "
            "collectives (all-to-all, all-gather over the process group) and each process's graph holds only its own "
            "chunk of the tokens, so one exported file per model cannot run it. Export from a single process without "
            "enable_parallelism (the exported graphs then run one request per GPU: data parallelism), or use "
            "tcpade_fx.compile(pipe) under context parallelism, which captures each process's graphs in place."
        )


def capture_for_export(
    target,
    example_call=None,
    *,
    dynamic_batch: bool = True,
    dynamic_tokens: bool = True,
    block_prefixes: tuple[str, ...] | None = None,
    input_gate: bool = False,
    per_sample: bool = True,
) -> ExportCapture:
    """Record the transformer's first call and build its verified graphs with batch and token axes symbolic
    where the model allows (:mod:`tcpade_fx.passes.dynamic`); with ``input_gate`` the graphs of
    ``Policy.input_gate`` (one gate per batch element where ``per_sample``).

    Raises :class:`~tcpade_fx.distributed.UnsupportedParallelismError` under context (or tensor) parallelism."""
    refuse_parallel(transformer_of(target))
    module, kwargs = record_call(target, example_call)
    leaves, _ = flatten_call((), kwargs)
    bad = [type(x).__name__ for x in leaves if not isinstance(x, (torch.Tensor, *CONSTANT_TYPES))]
    if bad:
        raise TypeError(f"cannot export call arguments of type {sorted(set(bad))}: only tensors and JSON constants")
    graphs = build_graphs(module, kwargs, dynamic=True, dynamic_batch=dynamic_batch, dynamic_tokens=dynamic_tokens,
                          block_prefixes=block_prefixes, input_gate=input_gate, per_sample=per_sample)
    return ExportCapture(module, graphs)
