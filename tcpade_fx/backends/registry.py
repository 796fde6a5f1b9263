"""The backend registry: each backend turns a GraphModule, or a graph file of an export folder, into a callable
the runtime steps with (``graph(*call_leaves[, residual]) -> tuple of tensors``).

    register_backend(Backend("eager", "...", compile_graph=lambda gm, name, on_compile, **_: gm))
    get_backend("inductor").compile_graph(gm, "compute", on_compile)
    get_backend("onnxruntime").load_graph(GraphFile(...), check_io)

``tcpade_fx.compile(backend=...)`` looks its backend up here, and ``tcpade_fx.export.load`` the one that opens the
folder's format (:func:`backend_for_format`); an unknown name's error lists what is registered.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

#: ``on_compile(name)``: called once per backend compilation of the graph ``name`` (the stats count them).
OnCompile = Callable[[str], None]
#: ``check_io(found_inputs, found_outputs)``: the loader's file declares these; raises when the manifest differs.
CheckIO = Callable[[list[dict], list[dict]], None]


class GraphCompiler(Protocol):
    def __call__(self, gm: torch.fx.GraphModule, name: str, on_compile: OnCompile, **options) -> Callable: ...


@dataclass(frozen=True)
class GraphFile:
    """One graph file of an export folder, as a loader needs it."""

    path: Path
    entry: dict  # the manifest's entry of this graph (file, sha256, inputs, outputs, ...)
    input_names: list[str]  # the graph's tensor inputs in order (the residual last for predict)
    tensor_positions: list[int]  # where the call's tensor leaves sit among all its leaves
    num_leaves: int  # the call's leaves (tensors and constants)


@dataclass(frozen=True)
class Backend:
    """A named way to run the graphs: ``compile_graph`` for GraphModules (``tcpade_fx.compile``), ``load_graph``
    for graph files of the export ``file_format`` (``tcpade_fx.export.load``); ``check_available`` raises, saying
    what to install, when the backend cannot run here."""

    name: str
    description: str
    compile_graph: GraphCompiler | None = None
    load_graph: Callable[..., Callable] | None = None
    file_format: str | None = None
    check_available: Callable[[], None] | None = None

    def require(self) -> "Backend":
        if self.check_available is not None:
            self.check_available()
        return self


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend, *, replace: bool = False) -> Backend:
    """Add ``backend`` to the registry (``replace`` to overwrite one of the same name)."""
    if backend.name in _REGISTRY and not replace:
        raise ValueError(f"a backend named {backend.name!r} is already registered; pass replace=True to replace it")
    _REGISTRY[backend.name] = backend
    return backend


def registered_backends() -> dict[str, Backend]:
    return dict(_REGISTRY)


def _listing(kind: str) -> str:
    return "; ".join(f"{b.name!r}: {b.description}" for b in _REGISTRY.values()
                     if (b.compile_graph if kind == "compile" else b.load_graph) is not None)


def get_backend(name: str) -> Backend:
    """The backend that compiles graphs for ``tcpade_fx.compile(backend=name)``."""
    backend = _REGISTRY.get(name)
    if backend is None or backend.compile_graph is None:
        raise ValueError(f"unknown backend {name!r}; registered backends: {_listing('compile')}")
    return backend


def backend_for_format(file_format: str) -> Backend:
    """The backend that opens the graph files of an export folder of ``file_format`` (``"onnx"``, ``"tensorrt"``)."""
    for backend in _REGISTRY.values():
        if backend.file_format == file_format and backend.load_graph is not None:
            return backend
    raise ValueError(f"no registered backend opens {file_format!r} exports; registered loaders: {_listing('load')}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class GraphFileError(ValueError):
    """A graph file cannot be opened by its backend, or does not declare what its manifest says."""
