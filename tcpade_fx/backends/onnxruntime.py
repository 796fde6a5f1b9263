"""``onnxruntime``: runs the ``.onnx`` graphs of an export folder (:func:`tcpade_fx.export.load`)."""

from __future__ import annotations

from pathlib import Path

import torch

from .registry import Backend, CheckIO, GraphFile, register_backend

#: ONNX TensorProto element types → torch dtype names.
ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
               11: "float64", 16: "bfloat16"}


def _io(values) -> list[dict]:
    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in t.shape.dim]
        out.append({"name": v.name, "dtype": ONNX_DTYPES.get(t.elem_type, f"onnx:{t.elem_type}"), "shape": shape})
    return out


def onnx_io(path: Path) -> tuple[list[dict], list[dict], int]:
    """Inputs, outputs (name, dtype, shape with dim names) and the default-domain opset of an ONNX file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return _io(model.graph.input), _io(model.graph.output), opset


def ort_session(path: Path, threads: int | None = None, providers=None, session_options=None):
    """An onnxruntime session (``threads``: intra-op threads, None for onnxruntime's default)."""
    import onnxruntime as ort

    options = session_options or ort.SessionOptions()
    if session_options is None:
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


class OnnxGraph:
    """One ONNX graph as the runtime calls it: ``graph(*call_leaves[, residual]) -> tuple of tensors``."""

    def __init__(self, file: GraphFile, threads: int | None = None, providers=None, session_options=None):
        self.session = ort_session(file.path, threads, providers, session_options)
        present = {i.name for i in self.session.get_inputs()}
        positions = file.tensor_positions
        self._inputs = [(name, pos) for name, pos in zip(file.input_names, positions) if name in present]
        self._extra = [name for name in file.input_names[len(positions):] if name in present]
        self._num_leaves = file.num_leaves

    def __call__(self, *args):
        leaves, extra = args[: self._num_leaves], args[self._num_leaves:]
        device = next((x.device for x in args if isinstance(x, torch.Tensor)), torch.device("cpu"))
        feeds = {name: leaves[pos].detach().cpu().contiguous().numpy() for name, pos in self._inputs}
        feeds.update({name: t.detach().cpu().contiguous().numpy() for name, t in zip(self._extra, extra)})
        outs = self.session.run(None, feeds)
        return tuple(torch.from_numpy(o).to(device) for o in outs)


def load_onnx_graph(file: GraphFile, check_io: CheckIO, *, threads: int | None = None, providers=None,
                    session_options=None) -> OnnxGraph:
    inputs, outputs, _ = onnx_io(file.path)
    check_io(inputs, outputs)
    return OnnxGraph(file, threads, providers, session_options)


def _require_onnxruntime() -> None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"onnxruntime is not installed ({exc}); pip install 'tcpade-fx[onnx]'") from exc


BACKEND = register_backend(Backend("onnxruntime", "runs exported .onnx graphs (tcpade_fx.export.load)",
                                   load_graph=load_onnx_graph, file_format="onnx",
                                   check_available=_require_onnxruntime))
