"""Export a TC-Padé transformer and run the export: ONNX (+ onnxruntime runner) and TensorRT engines.

    tcpade_fx.export.to_onnx(pipe, "dit-onnx", policy="balanced")     # compute.onnx, predict.onnx, manifest.json
    tcpade_fx.export.load("dit-onnx").install(pipe)                     # TC-Padé in Python, graphs in onnxruntime
    images = pipe([3, 4, 5], num_inference_steps=28).images

``to_tensorrt`` writes one raw TensorRT engine per graph with the same manifest; ``load`` opens either kind.
"""

from .manifest import ManifestMismatchError
from .onnx import to_onnx
from .runner import ExportedTCPade, load
from .tensorrt import TensorRTUnavailableError, require_tensorrt, to_tensorrt

__all__ = [
    "ExportedTCPade",
    "ManifestMismatchError",
    "TensorRTUnavailableError",
    "load",
    "require_tensorrt",
    "to_onnx",
    "to_tensorrt",
]
