"""``backend="tensorrt"``: Torch-TensorRT, as a graph compiler of the runtime and as the runner of exported
raw engines (``tcpade_fx.export.to_tensorrt`` writes them, ``tcpade_fx.export.load`` opens them here).

* ``tcpade_fx.compile(pipe, backend="tensorrt")``: :func:`compile_graph_tensorrt` exports each graph at its first
  call (tensor inputs only, constants baked in) and compiles it with
  ``torch_tensorrt.dynamo.compile(exported_program, arg_inputs=[...])`` on that call's inputs.
* :class:`TensorRTEngineGraph` runs one raw engine with the ``tensorrt`` Python runtime
  (``deserialize_cuda_engine`` + ``execute_async_v3`` on torch CUDA tensors).

Requirements: an NVIDIA GPU, a CUDA build of torch, and ``pip install "torch-tensorrt==<torch major.minor>.*"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from .registry import Backend, CheckIO, GraphFile, GraphFileError, dtype_name, register_backend
from .tensor_only import TensorOnly


class TensorRTUnavailableError(RuntimeError):
    """torch_tensorrt, tensorrt or CUDA is missing; the message says what to install."""


def _install_hint() -> str:
    major_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    return (
        "TensorRT needs an NVIDIA GPU with its driver, a CUDA build of torch (e.g. `pip install "
        f"torch=={torch.__version__.split('+')[0]} --index-url https://download.pytorch.org/whl/cu130`) and "
        f'Torch-TensorRT for that torch: `pip install "torch-tensorrt=={major_minor}.*"` (it brings tensorrt-cu13 '
        "from https://pypi.nvidia.com). Without them, export ONNX instead (tcpade_fx.export.to_onnx) and run it "
        "with onnxruntime, or build engines from the ONNX files with trtexec."
    )


def require_tensorrt():
    """Return the ``torch_tensorrt`` module, or raise :class:`TensorRTUnavailableError` saying what is missing."""
    missing = []
    try:
        import torch_tensorrt  # noqa: F811
    except Exception as exc:  # ImportError, or a broken install raising OSError on its shared libraries
        missing.append(f"torch_tensorrt is not importable ({type(exc).__name__}: {exc})")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        missing.append(f"CUDA is not available (torch {torch.__version__} is {build}, or no GPU is visible)")
    if missing:
        raise TensorRTUnavailableError("TensorRT backend unavailable: " + "; ".join(missing) + ". " + _install_hint())
    return torch_tensorrt


def _tensor_positions(args) -> list[int]:
    return [i for i, x in enumerate(args) if isinstance(x, torch.Tensor)]


def compile_graph_tensorrt(gm: torch.fx.GraphModule, name: str, on_compile, **settings) -> Callable:
    """A callable ``(*args) -> tuple`` that compiles ``gm`` with Torch-TensorRT at its first call (on that call's
    inputs) and reports the compile with ``on_compile(name)``.

    ``settings`` go to ``torch_tensorrt.dynamo.compile`` (e.g. ``enabled_precisions={torch.float16}``,
    ``require_full_compilation=True``).
    """
    torch_tensorrt = require_tensorrt()
    state: dict[str, Any] = {}

    def run(*args):
        positions = _tensor_positions(args)
        tensors = [args[i] for i in positions]
        if "compiled" not in state:
            wrapper = TensorOnly(gm, list(args), positions).eval()
            with torch.no_grad():
                ep = torch.export.export(wrapper, tuple(tensors), strict=False)
                state["compiled"] = torch_tensorrt.dynamo.compile(ep, arg_inputs=tensors, **settings)
            on_compile(name)
        out = state["compiled"](*tensors)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    return run


_TRT_TO_TORCH = {
    "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
    "INT64": torch.int64, "BOOL": torch.bool, "INT8": torch.int8, "UINT8": torch.uint8,
}


def _torch_dtype(trt_dtype) -> torch.dtype:
    name = getattr(trt_dtype, "name", str(trt_dtype)).split(".")[-1]
    if name not in _TRT_TO_TORCH:
        raise GraphFileError(f"TensorRT tensor type {name} has no torch equivalent here")
    return _TRT_TO_TORCH[name]


def engine_io(engine) -> tuple[list[dict], list[dict]]:
    import tensorrt as trt

    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        shape = [int(d) if int(d) >= 0 else "batch" for d in engine.get_tensor_shape(name)]
        entry = {"name": name, "dtype": dtype_name(_torch_dtype(engine.get_tensor_dtype(name))), "shape": shape}
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(entry)
    return inputs, outputs


def deserialize_engine(data: bytes):
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise GraphFileError(
            "TensorRT could not deserialize the engine: it was built for another TensorRT version or GPU "
            "(engines are not portable); rebuild it on this machine with to_tensorrt"
        )
    return runtime, engine


class TensorRTEngineGraph:
    """One raw TensorRT engine as the runtime calls it: ``graph(*call_leaves[, residual]) -> tuple``."""

    def __init__(self, file: GraphFile, check_io: CheckIO):
        require_tensorrt()
        self.runtime, self.engine = deserialize_engine(Path(file.path).read_bytes())
        check_io(*engine_io(self.engine))
        entry = file.entry
        self.context = self.engine.create_execution_context()
        self._num_leaves = file.num_leaves
        self._inputs = [(e["name"], int(e["position"]), _TRT_TO_TORCH_NAME[e["dtype"]]) for e in entry["inputs"]]
        self._outputs = [(e["name"], _TRT_TO_TORCH_NAME[e["dtype"]]) for e in entry["outputs"]]

    def __call__(self, *args):
        leaves, extra = args[: self._num_leaves], list(args[self._num_leaves:])
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)] + extra
        keep = []
        for name, pos, dtype in self._inputs:
            t = tensors[pos].to(device="cuda", dtype=dtype).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = []
        for name, dtype in self._outputs:
            o = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, o.data_ptr())
            outs.append(o)
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return tuple(outs)


_TRT_TO_TORCH_NAME = {dtype_name(v): v for v in _TRT_TO_TORCH.values()}


def load_engine_graph(file: GraphFile, check_io: CheckIO) -> TensorRTEngineGraph:
    return TensorRTEngineGraph(file, check_io)


BACKEND = register_backend(Backend(
    "tensorrt", "Torch-TensorRT: compiles the graphs (needs CUDA and torch-tensorrt); runs exported .engine files",
    compile_graph=compile_graph_tensorrt, load_graph=load_engine_graph, file_format="tensorrt",
    check_available=lambda: require_tensorrt() and None,
))
