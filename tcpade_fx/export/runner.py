"""Run an export folder: the TC-Padé controller in Python, the two graphs in onnxruntime or TensorRT.

    runner = tcpade_fx.export.load("dit-onnx")               # checks manifest, hashes, declared inputs
    runner.install(pipe)                                      # pipe.transformer.forward -> this runner
    images = pipe([3, 4, 5], num_inference_steps=28).images
    print(pipe.tcpade.stats)                                  # the same stats as tcpade_fx.compile
    tcpade_fx.disable(pipe)

The stepping logic is :class:`tcpade_fx.runtime.TCPadeRuntime` itself, given the exported graphs through its
``graph_source`` hook: identical decisions, per-CFG-branch histories and stats, and no second controller to
keep in sync. Nothing from the folder is unpickled: it holds the graph files and ``manifest.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch
from torch.utils import _pytree as pytree

from ..backends import GraphFile, backend_for_format
from ..integration import install_runtime, remove_runtime, transformer_of
from ..passes import BlockStackPlan, flatten_call
from ..policy import Policy
from ..runtime import GraphSet, TCPadeRuntime
from .hashing import weights_sha256
from .manifest import (
    ManifestMismatchError,
    check_call,
    check_graph_file,
    compare_io,
    read_manifest,
    resolve_load_policy,
)


class ExportedTCPade:
    """An export folder, checked and ready to drive a transformer. Create with :func:`load`."""

    def __init__(self, folder: Path, manifest: dict, policy: Policy, compute: Callable, predict: Callable):
        self.folder = folder
        self.manifest = manifest
        self.policy = policy
        self.compute = compute
        self.predict = predict
        call = manifest["call"]
        self.in_spec = pytree.treespec_loads(json.dumps(call["in_spec"]))
        self.out_spec = pytree.treespec_loads(json.dumps(call["out_spec"]))
        self.timestep_position = int(call["timestep_leaf"])

    @property
    def backend(self) -> str:
        return self.manifest["backend"]

    def graphs_for(self, kwargs: dict) -> GraphSet:
        """The runtime's ``graph_source``: check a new call signature against the manifest, return the graphs."""
        leaves, spec = flatten_call((), kwargs, self.in_spec)
        check_call(self.manifest, leaves, spec)
        stack = self.manifest["block_stack"]
        plan = BlockStackPlan(
            prefixes=tuple(stack["prefixes"]), num_blocks=stack["num_blocks"], body_nodes=frozenset(),
            body_input=stack["body_input"], body_output=stack["body_output"],
        )
        return GraphSet(plan=plan, compute=self.compute, predict=self.predict, out_spec=self.out_spec,
                       in_spec=self.in_spec, timestep_position=self.timestep_position,
                       input_gate=bool(self.manifest["call"].get("input_gate")))

    def runtime(self, module: torch.nn.Module) -> TCPadeRuntime:
        """A :class:`TCPadeRuntime` for ``module`` (used for its forward signature) that runs these graphs."""
        return TCPadeRuntime(module, self.policy, verify=False, graph_source=self.graphs_for)

    def install(self, target, *, check_weights: bool = True):
        """Make ``target`` (pipeline or transformer) sample through these graphs; returns it, like
        :func:`tcpade_fx.compile` (undo with :func:`tcpade_fx.disable`).

        With ``check_weights`` the transformer's state_dict hash must be the exported one (the graphs carry
        their own weights; a different transformer would mean the pipeline and the export disagree).
        """
        transformer = transformer_of(target)
        model_class = f"{type(transformer).__module__}.{type(transformer).__name__}"
        if model_class != self.manifest["model_class"]:
            raise ManifestMismatchError(
                f"the export is of a {self.manifest['model_class']}, the target's transformer is a {model_class}"
            )
        if check_weights:
            remove_runtime(target)
            digest = weights_sha256(transformer)
            if digest != self.manifest["weights_sha256"]:
                raise ManifestMismatchError(
                    f"the transformer's weights (sha256 {digest[:16]}…) are not those exported "
                    f"({self.manifest['weights_sha256'][:16]}…); pass check_weights=False to run the exported "
                    "graphs regardless"
                )
        return install_runtime(target, self.runtime(transformer))

    def __repr__(self) -> str:
        return (f"ExportedTCPade({str(self.folder)!r}, backend={self.backend!r}, policy={self.policy.name!r}, "
                f"model={self.manifest['model_class'].rsplit('.', 1)[-1]})")


def _declared(entries: list[dict]) -> list[dict]:
    return [{k: e[k] for k in ("name", "dtype", "shape")} for e in entries]


def _graph_inputs(manifest: dict, which: str) -> tuple[list[str], list[int]]:
    call = manifest["call"]
    tensors = [e for e in call["leaves"] if e["kind"] == "tensor"]
    extra = [call["residual"]["name"], *([call["input_gate"]["gate"]["name"]] if call.get("input_gate") else [])]
    names = [e["name"] for e in tensors] + (extra if which == "predict" else [])
    return names, [e["index"] for e in tensors]


def load(
    out_dir: str | os.PathLike,
    *,
    policy: Policy | str | None = None,
    allow_policy_change: bool = False,
    threads: int | None = None,
    providers: list | None = None,
    session_options=None,
) -> ExportedTCPade:
    """Open an export folder written by :func:`to_onnx` or :func:`to_tensorrt`.

    Refuses (:class:`ManifestMismatchError`, saying what differs) a folder written by another library version,
    a manifest whose policy fields do not match this library's Policy, a ``policy`` that differs from the
    exported one (unless ``allow_policy_change``: the graphs do not depend on it), a graph file whose sha256 or
    declared inputs/outputs differ from the manifest. Calls whose inputs do not match the exported shapes,
    dtypes or constants are refused when they reach the runner.

    Args:
        policy: expected (or, with ``allow_policy_change``, replacement) policy; default: the exported one.
        threads: onnxruntime intra-op threads (None: onnxruntime's default).
        providers: onnxruntime execution providers (default CPU).
        session_options: an ``onnxruntime.SessionOptions`` to use as is.
    """
    folder = Path(out_dir)
    manifest = read_manifest(folder)
    chosen = resolve_load_policy(manifest, policy, allow_policy_change)
    graphs = manifest.get("graphs", {})
    if set(graphs) != {"compute", "predict"}:
        raise ManifestMismatchError(f"manifest lists graphs {sorted(graphs)}; expected compute and predict")
    try:
        backend = backend_for_format(manifest["backend"]).require()
    except ValueError as exc:
        raise ManifestMismatchError(f"manifest backend {manifest['backend']!r}: {exc}") from None
    onnx_options = {"threads": threads, "providers": providers, "session_options": session_options}
    options = onnx_options if backend.file_format == "onnx" else {}
    num_leaves = len(manifest["call"]["leaves"])
    built = {}
    for which in ("compute", "predict"):
        entry = graphs[which]
        path = check_graph_file(folder, which, entry)
        if "external_data" in entry:
            check_graph_file(folder, f"{which} external data", entry["external_data"])
        names, positions = _graph_inputs(manifest, which)

        def check_io(inputs, outputs, which=which, entry=entry):
            compare_io(which, _declared(entry["inputs"]), inputs, "inputs")
            compare_io(which, _declared(entry["outputs"]), outputs, "outputs")

        built[which] = backend.load_graph(GraphFile(path, entry, names, positions, num_leaves), check_io, **options)
    return ExportedTCPade(folder, manifest, chosen, built["compute"], built["predict"])
