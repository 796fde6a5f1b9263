"""TensorRT engine export with the ONNX manifest (the ``backend="tensorrt"`` compiler of the runtime and the
engine runner are in :mod:`tcpade_fx.backends.tensorrt`).

One engine per graph (``compute`` and ``predict``), the decision staying in Python: :func:`to_tensorrt` writes ``compute.engine``, ``predict.engine`` (raw serialized engines from
  ``torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine``, dynamic batch through
  ``torch_tensorrt.Input(min_shape, opt_shape, max_shape)``; token axes static, see the manifest's
  ``static_axes``) and the same ``manifest.json`` as
  :func:`tcpade_fx.export.to_onnx`. :func:`tcpade_fx.export.load` opens it and runs the engines with the
``tensorrt`` Python runtime (``deserialize_cuda_engine`` + ``execute_async_v3`` on torch CUDA tensors). Raw
  engines rather than ``torch_tensorrt.save``: the ``.ep`` format stores pickled pieces and needs Torch-TensorRT's
  C++ runtime to load; an engine file is plain TensorRT and nothing in the folder is unpickled.

Alternative without Torch-TensorRT (build the engines from the ONNX export with ``trtexec``)::

    tcpade_fx.export.to_onnx(pipe, "dit-onnx")
    trtexec --onnx=dit-onnx/compute.onnx --saveEngine=compute.engine \\
        --minShapes=hidden_states:1x1x28x28,timestep:1,class_labels:1 \\
        --optShapes=hidden_states:4x1x28x28,timestep:4,class_labels:4 \\
        --maxShapes=hidden_states:64x1x28x28,timestep:64,class_labels:64
    trtexec --onnx=dit-onnx/predict.onnx --saveEngine=predict.engine  (same shapes, plus
        tcpade_residual:1x49x128 / 4x49x128 / 64x49x128)

(input names and shapes are in ``manifest.json``). Such engines suit a C++ or Triton deployment that
re-implements the controller; in Python the simplest equivalent is onnxruntime's TensorRT execution provider on
the ONNX export: ``tcpade_fx.export.load("dit-onnx", providers=["TensorrtExecutionProvider",
"CUDAExecutionProvider"])``.

Requirements: an NVIDIA GPU, a CUDA build of torch, and ``pip install "torch-tensorrt==<torch major.minor>.*"``
(each Torch-TensorRT release pins one torch minor version; it pulls ``tensorrt-cu13*`` from pypi.nvidia.com).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..backends import GraphFile, TensorOnly
from ..backends.tensorrt import (
    TensorRTEngineGraph, TensorRTUnavailableError, deserialize_engine, engine_io, require_tensorrt,
)
from ..policy import Policy, resolve_policy
from .capture import GATE, RESIDUAL, ExportCapture, capture_for_export
from .checks import exported_pair_errors, reference_outputs
from .hashing import file_sha256, weights_sha256
from .manifest import base_manifest, require_exportable_policy, write_manifest

#: the batch axis of each graph input beyond the call
EXTRA_BATCH_AXIS = {RESIDUAL: 0, GATE: 1}
__all__ = ["TensorRTUnavailableError", "prepare_tensorrt_export", "require_tensorrt", "to_tensorrt"]


# -- export -------------------------------------------------------------------------------------------------
@dataclass
class PreparedGraph:
    """One graph ready for the TensorRT converter: its ExportedProgram and the min/opt/max input shapes."""

    name: str
    exported: torch.export.ExportedProgram
    input_names: list[str]
    shapes: list[dict]  # per tensor input: {"min": [...], "opt": [...], "max": [...], "dtype": torch dtype}
    output_names: list[str]


def prepare_tensorrt_export(
    cap: ExportCapture, min_batch: int = 1, opt_batch: int | None = None, max_batch: int | None = None
) -> dict[str, PreparedGraph]:
    """The torch side of :func:`to_tensorrt` (no TensorRT needed): export each graph's tensor-only wrapper with
    the batch axis symbolic in ``[min_batch, max_batch]`` and derive the ``torch_tensorrt.Input`` ranges.

    Token axes stay static in engines (capture with ``dynamic_tokens=False``, as :func:`to_tensorrt` does)."""
    if cap.token_dims:
        raise ValueError(
            f"TensorRT engines are built with a dynamic batch only; this capture has dynamic token dimensions "
            f"{cap.token_dims}: capture with capture_for_export(..., dynamic_tokens=False)"
        )
    batch = cap.batch_size
    if cap.batch_leaves:
        opt_batch = opt_batch or batch
        max_batch = max_batch or max(opt_batch, 2 * batch)
        if not min_batch <= opt_batch <= max_batch:
            raise ValueError(f"need min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}")
        dim = torch.export.Dim("batch", min=min_batch, max=max_batch)
    prepared = {}
    for which in ("compute", "predict"):
        gm = cap.predict if which == "predict" else cap.compute
        extra, extra_names, extra_outputs = cap.extra_io(which)
        wrapper = TensorOnly(gm, cap.leaves, cap.tensor_positions, extra=len(extra)).eval()
        args = [cap.leaves[i] for i in cap.tensor_positions] + extra
        # the batch axis: axis 0 of the batched leaves and of the residual, axis 1 of the gate's (4, *residual)
        axes = [0 if i in cap.batch_leaves else None for i in cap.tensor_positions]
        axes += [EXTRA_BATCH_AXIS[name] if cap.batch_leaves else None for name in extra_names]
        dynamic = (tuple(None if a is None else {a: dim} for a in axes),) if cap.batch_leaves else None
        with torch.no_grad():
            ep = torch.export.export(wrapper, tuple(args), strict=False, dynamic_shapes=dynamic)
        shapes = []
        for t, a in zip(args, axes):
            s = list(t.shape)
            sized = (lambda n, s=s, a=a: s if a is None else [*s[:a], n, *s[a + 1:]])
            shapes.append({"min": sized(min_batch), "opt": sized(opt_batch), "max": sized(max_batch), "dtype": t.dtype})
        prepared[which] = PreparedGraph(
            name=which, exported=ep, shapes=shapes,
            input_names=cap.tensor_names + extra_names, output_names=cap.output_names + extra_outputs,
        )
    return prepared


def to_tensorrt(
    target,
    out_dir: str | os.PathLike,
    example_call=None,
    policy: Policy | str = "balanced",
    *,
    dynamic_batch: bool = True,
    min_batch: int = 1,
    opt_batch: int | None = None,
    max_batch: int | None = None,
    check: bool = True,
    tolerance: float | None = None,
    block_prefixes: tuple[str, ...] | None = None,
    **settings,
) -> Path:
    """Write ``compute.engine``, ``predict.engine`` and ``manifest.json`` (same manifest as :func:`to_onnx`,
    ``backend: "tensorrt"``). The pipeline must already be on the CUDA device the engines are built for.

    ``settings`` go to ``convert_exported_program_to_serialized_trt_engine`` (e.g.
    ``enabled_precisions={torch.float16}``, ``workspace_size``). ``max_batch`` defaults to twice the example
    batch. Engines are specific to the GPU model and TensorRT version; the manifest records both.
    """
    policy = require_exportable_policy(resolve_policy(policy))
    torch_tensorrt = require_tensorrt()
    import tensorrt as trt

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    # token axes static: engines would need a min/opt/max range for each (not exposed here)
    cap = capture_for_export(target, example_call, dynamic_batch=dynamic_batch, dynamic_tokens=False,
                             block_prefixes=block_prefixes, input_gate=policy.input_gate, per_sample=policy.per_sample)
    _require_cuda_inputs(cap)
    prepared = prepare_tensorrt_export(cap, min_batch, opt_batch, max_batch)
    manifest = base_manifest(cap, policy, "tensorrt", weights_sha256(cap.module))
    for which, prep in prepared.items():
        inputs = [
            torch_tensorrt.Input(min_shape=s["min"], opt_shape=s["opt"], max_shape=s["max"], dtype=s["dtype"])
            if s["min"] != s["max"] else torch_tensorrt.Input(shape=s["opt"], dtype=s["dtype"])
            for s in prep.shapes
        ]
        engine_bytes = torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine(
            prep.exported, arg_inputs=inputs, **settings
        )
        path = folder / f"{which}.engine"
        path.write_bytes(bytes(engine_bytes))
        _, engine = deserialize_engine(path.read_bytes())
        engine_inputs, engine_outputs = engine_io(engine)
        user_inputs = list(prep.exported.graph_signature.user_inputs)
        positions = {n: k for k, n in enumerate(user_inputs)}
        missing = [e["name"] for e in engine_inputs if e["name"] not in positions]
        if missing:
            raise RuntimeError(f"{which}.engine has inputs {missing} that are not graph inputs {user_inputs}")
        manifest["graphs"][which] = {
            "file": path.name, "sha256": file_sha256(path),
            "inputs": [{**e, "position": positions[e["name"]], "as": prep.input_names[positions[e["name"]]]}
                       for e in engine_inputs],
            "outputs": [{**e, "as": n} for e, n in zip(engine_outputs, prep.output_names)],
            "shape_ranges": {n: {k: s[k] for k in ("min", "opt", "max")} for n, s in zip(prep.input_names, prep.shapes)},
        }
    manifest["tensorrt"] = {
        "torch_tensorrt_version": getattr(torch_tensorrt, "__version__", "?"),
        "tensorrt_version": trt.__version__,
        "device": torch.cuda.get_device_name(),
        "compute_capability": list(torch.cuda.get_device_capability()),
        "batch_range": [min_batch, opt_batch or cap.batch_size, max_batch] if cap.batch_leaves else None,
        "settings": {k: repr(v) for k, v in settings.items()},
    }
    if check:  # before the manifest: a folder whose engines failed the check must not load
        manifest["verification"] = _check_engines(cap, folder, manifest, tolerance)
    write_manifest(folder, manifest)
    return folder


def _require_cuda_inputs(cap: ExportCapture) -> None:
    devices = {x.device.type for x in cap.leaves if isinstance(x, torch.Tensor)}
    if devices != {"cuda"}:
        raise ValueError(f"move the pipeline to CUDA before to_tensorrt (its transformer ran on {sorted(devices)})")


def _check_engines(cap: ExportCapture, folder: Path, manifest: dict, tolerance: float | None) -> dict:
    """Both engines against the PyTorch transformer on the example call: the compute engine's outputs, and the
    predict engine's outputs given the compute engine's (true) residual. Returns the verification record."""
    tol = tolerance if tolerance is not None else 1e-2  # TF32 and tactic choice: looser than ORT on CPU
    names = {w: cap.tensor_names + cap.extra_io(w)[1] for w in ("compute", "predict")}
    graphs = {w: TensorRTEngineGraph(GraphFile(folder / f"{w}.engine", manifest["graphs"][w], names[w],
                                               cap.tensor_positions, len(cap.leaves)), check_io=lambda *_: None)
              for w in ("compute", "predict")}
    ref = reference_outputs(cap.module, cap.leaves, cap.in_spec)
    with torch.no_grad():
        errs = exported_pair_errors(cap.input_gate, cap.compute, cap.predict, cap.leaves, ref,
                                    lambda: graphs["compute"](*cap.leaves),
                                    lambda *extra: graphs["predict"](*cap.leaves, *extra))
    if not max(errs.values()) <= tol:
        raise RuntimeError(f"the TensorRT engines differ from the PyTorch transformer: {errs} (relative, allowed "
                           f"{tol:g}); the engines in {folder} are not usable (no manifest was written)")
    return {"tolerance": tol, **errs}
