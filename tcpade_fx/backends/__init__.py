"""Backends: how the compute and predict graphs run. One module per backend, each registering itself:

* ``eager`` (:mod:`.eager`), ``inductor`` (:mod:`.inductor`) and ``tensorrt`` (:mod:`.tensorrt`, needs CUDA and
  torch-tensorrt) compile GraphModules for ``tcpade_fx.compile(backend=...)``;
* ``onnxruntime`` (:mod:`.onnxruntime`) and ``tensorrt`` open the graph files of an export folder for
  ``tcpade_fx.export.load``.

Add one with :func:`register_backend` (see :mod:`.registry`).
"""

from . import eager, inductor, onnxruntime, tensorrt  # noqa: F401  (each registers its backend)
from .registry import (
    Backend,
    GraphFile,
    GraphFileError,
    backend_for_format,
    get_backend,
    register_backend,
    registered_backends,
)
from .tensor_only import TensorOnly
from .tensorrt import TensorRTUnavailableError, require_tensorrt

__all__ = [
    "Backend",
    "GraphFile",
    "GraphFileError",
    "TensorOnly",
    "TensorRTUnavailableError",
    "backend_for_format",
    "get_backend",
    "register_backend",
    "registered_backends",
    "require_tensorrt",
]
