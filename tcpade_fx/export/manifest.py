"""manifest.json of an export folder: what was exported, from what, and the checks a loader makes against it.

The folder holds only the graph files (``.onnx`` or raw TensorRT ``.engine``) and this JSON file; nothing in it
is ever unpickled. :func:`read_manifest` refuses a manifest written by another library version, one whose policy
fields do not match this library's :class:`~tcpade_fx.Policy`, or graph files whose hash or declared inputs and
outputs differ from it; each refusal says what differs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..policy import PRESETS, Policy, resolve_policy
from ..backends import GraphFileError
from ..backends.registry import dtype_name
from ..passes.dynamic import BATCH, axis_expr
from .capture import GATE, RESIDUAL, STACK_INPUT, ExportCapture
from .hashing import file_sha256

FORMAT = "tcpade-fx-export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ManifestMismatchError(GraphFileError):
    """The export folder does not match this library, the requested policy or the inputs it is called with."""


def _version() -> str:
    from .. import __version__

    return __version__


def policy_fields(policy: Policy) -> dict:
    return dataclasses.asdict(policy)


def call_section(cap: ExportCapture) -> dict:
    """The call's leaves (tensor or constant, shape, dtype, dynamic axes and why the others are static), the
    dynamic dimensions and their ranges, pytree specs and the timestep input.

    ``dynamic_axes`` of a tensor maps an axis (as a string) to a dimension of ``dims``; every axis of the same
    dimension takes the same size in a call. ``static_axes`` maps each other axis to the reason it is static.
    ``input_gate`` (graphs of ``Policy.input_gate`` only) names the compute graph's stack-input output and the
    predict graph's gate input.
    """
    residual_axes = {str(a): axis_expr(*e) for a, e in cap.residual_axes.items()}
    leaves = []
    for i, (name, x) in enumerate(zip(cap.leaf_names, cap.leaves)):
        if isinstance(x, torch.Tensor):
            leaves.append({
                "index": i, "name": name, "kind": "tensor", "shape": list(x.shape), "dtype": dtype_name(x.dtype),
                "dynamic_axes": {str(a): n for a, n in cap.dynamic_axes.get(i, {}).items()},
                "static_axes": {str(a): why for a, why in cap.static_axes.get(i, {}).items()},
            })
        else:
            leaves.append({"index": i, "name": name, "kind": "constant", "value": x})
    return {
        "in_spec": json.loads(pytree.treespec_dumps(cap.in_spec)),
        "out_spec": json.loads(pytree.treespec_dumps(cap.out_spec)),
        "leaves": leaves,
        "outputs": cap.output_names,
        "timestep_input": cap.leaf_names[cap.timestep_position],
        "timestep_leaf": cap.timestep_position,
        "residual": {
            "name": RESIDUAL, "shape": list(cap.residual.shape), "dtype": "float32",
            "dynamic_axes": residual_axes,
        },
        **({"input_gate": {
            "stack_input": {"name": STACK_INPUT, "shape": list(cap.residual.shape), "dtype": "float32",
                            "dynamic_axes": residual_axes},
            "gate": {"name": GATE, "shape": [4, *cap.residual.shape], "dtype": "float32",
                     "dynamic_axes": {str(int(a) + 1): d for a, d in residual_axes.items()}},
        }} if cap.input_gate else {}),
        "batch": cap.dims.get(BATCH),
        "dims": cap.dims,
    }


def base_manifest(cap: ExportCapture, policy: Policy, backend: str, weights_sha256: str) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": _version(),
        "torch_version": torch.__version__,
        "backend": backend,
        "model_class": f"{type(cap.module).__module__}.{type(cap.module).__name__}",
        "weights_sha256": weights_sha256,
        "weights_hash_recipe": "sha256 over sorted state_dict entries: name|dtype|shape| then raw bytes",
        "policy": policy_fields(policy),
        "block_stack": {
            "prefixes": list(cap.plan.prefixes), "num_blocks": cap.plan.num_blocks,
            "body_input": cap.plan.body_input, "body_output": cap.plan.body_output,
        },
        "call": call_section(cap),
        "notes": list(cap.notes),
        "graphs": {},
    }


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    path = Path(out_dir) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


# -- reading and checking -----------------------------------------------------------------------------------
def _policy_from_fields(fields: Any) -> Policy:
    if not isinstance(fields, dict):
        raise ManifestMismatchError("manifest policy is not an object of Policy fields")
    known = {f.name for f in dataclasses.fields(Policy)}
    missing, unknown = sorted(known - set(fields)), sorted(set(fields) - known)
    if missing or unknown:
        raise ManifestMismatchError(
            f"manifest policy fields do not match this library's Policy: missing {missing}, unknown {unknown}"
        )
    try:
        policy = Policy(**fields)
    except (TypeError, ValueError) as exc:
        raise ManifestMismatchError(f"manifest policy is not valid here: {exc}") from None
    if policy.name in PRESETS:
        preset = policy_fields(PRESETS[policy.name])
        diff = {k: (v, preset[k]) for k, v in fields.items() if preset[k] != v}
        if diff:
            raise ManifestMismatchError(
                f"manifest policy claims the preset {policy.name!r} but its fields differ from this library's "
                "preset (manifest, library): " + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
            )
    return policy


def policy_difference(a: Policy, b: Policy) -> dict:
    fa, fb = policy_fields(a), policy_fields(b)
    return {k: (fa[k], fb[k]) for k in fa if k != "name" and fa[k] != fb[k]}


def read_manifest(out_dir: Path) -> dict:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a tcpade_fx export folder (write one with to_onnx)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestMismatchError(f"{path} is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ManifestMismatchError(
            f"{path} is format {manifest.get('format')!r} v{manifest.get('format_version')!r}; this library reads "
            f"{FORMAT!r} v{FORMAT_VERSION}"
        )
    if manifest.get("library_version") != _version():
        raise ManifestMismatchError(
            f"export was written by tcpade_fx {manifest.get('library_version')!r}, this is tcpade_fx {_version()!r}; "
            "re-export with this version (graphs and policy semantics may differ between versions)"
        )
    return manifest


def require_exportable_policy(policy: Policy) -> Policy:
    """Exported graphs forecast the block stack's residual; a policy asking for another granularity is refused
    (the graphs would not be what it describes)."""
    if policy.granularity != "stack":
        raise ValueError(
            f"policy {policy.name!r} has granularity={policy.granularity!r}; exported graphs (ONNX, TensorRT) have "
            "symbolic shapes and forecast the block stack's residual only. Export with granularity='stack' "
            "(policy.replace(granularity='stack')), or run granularity='modules' with tcpade_fx.compile(pipe, ...)"
        )
    return policy


#: Policy fields the exported graphs are built for (the others only steer the runtime in Python): with the input
#: gate the compute graph returns the stack input, the predict graph takes the gate and fits it per sample or not.
GRAPH_FIELDS = ("input_gate", "per_sample")


def _graph_difference(exported: Policy, wanted: Policy) -> dict:
    if not (exported.input_gate or wanted.input_gate):
        return {}
    return {k: (getattr(exported, k), getattr(wanted, k)) for k in GRAPH_FIELDS
            if getattr(exported, k) != getattr(wanted, k)}


def resolve_load_policy(manifest: dict, policy, allow_policy_change: bool) -> Policy:
    exported = _policy_from_fields(manifest.get("policy"))
    carried = bool(manifest.get("call", {}).get("input_gate"))
    if exported.input_gate != carried:
        raise ManifestMismatchError(
            f"the manifest's policy has input_gate={exported.input_gate} but its graphs "
            + ("carry" if carried else "do not carry") + " the input gate's tensors; re-export the folder"
        )
    if policy is None:
        return exported
    wanted = require_exportable_policy(resolve_policy(policy))
    graph_diff = _graph_difference(exported, wanted)
    if graph_diff:
        raise ManifestMismatchError(
            "the exported graphs were built for input_gate / per_sample as the export's policy has them, and the "
            "requested policy differs in "
            + ", ".join(f"{k}: {a!r} (export) vs {b!r} (requested)" for k, (a, b) in graph_diff.items())
            + ": re-export with the policy you want to run (tcpade_fx.export.to_onnx(..., policy=...))"
        )
    diff = policy_difference(exported, wanted)
    if diff and not allow_policy_change:
        raise ManifestMismatchError(
            f"the export was made with policy {exported.name!r}; the requested policy {wanted.name!r} differs in "
            + ", ".join(f"{k}: {a!r} (export) vs {b!r} (requested)" for k, (a, b) in diff.items())
            + ". Only input_gate and per_sample (with the gate) change the graphs: pass allow_policy_change=True to "
            "run them with it anyway"
        )
    return wanted


def check_graph_file(out_dir: Path, name: str, entry: dict) -> Path:
    path = Path(out_dir) / entry["file"]
    if Path(entry["file"]).name != entry["file"]:
        raise ManifestMismatchError(f"graph {name!r} file {entry['file']!r} must be a plain name inside the folder")
    if not path.is_file():
        raise FileNotFoundError(f"graph {name!r}: {path} is missing")
    digest = file_sha256(path)
    if digest != entry.get("sha256"):
        raise ManifestMismatchError(
            f"graph {name!r}: {path.name} has sha256 {digest[:16]}…, the manifest records "
            f"{str(entry.get('sha256'))[:16]}… (file changed after export)"
        )
    return path


def compare_io(name: str, declared: list[dict], found: list[dict], what: str) -> None:
    """Names, shapes and dtypes the manifest declares for a graph must be those the graph file declares."""
    problems = []
    if [d["name"] for d in declared] != [f["name"] for f in found]:
        problems.append(f"{what} names {[f['name'] for f in found]} vs manifest {[d['name'] for d in declared]}")
    else:
        for d, f in zip(declared, found):
            if d["dtype"] != f["dtype"]:
                problems.append(f"{what} {d['name']}: dtype {f['dtype']} vs manifest {d['dtype']}")
            if list(d["shape"]) != list(f["shape"]):
                problems.append(f"{what} {d['name']}: shape {f['shape']} vs manifest {d['shape']}")
    if problems:
        raise ManifestMismatchError(f"graph {name!r} does not match its manifest: " + "; ".join(problems))


def _kwarg_specs(spec: pytree.TreeSpec) -> dict | None:
    try:
        kwargs = spec.child(1)
        return {k: kwargs.child(i) for i, k in enumerate(kwargs.context)}
    except Exception:  # not an (args, kwargs) spec
        return None


def _spec_difference(got: pytree.TreeSpec, want: pytree.TreeSpec) -> str:
    g, w = _kwarg_specs(got), _kwarg_specs(want)
    if g is None or w is None:
        return f"got {got}, the export expects {want}"
    parts = [f"{k} is missing" for k in w if k not in g] + [f"{k} is not an exported argument" for k in g if k not in w]
    parts += [f"{k} has structure {g[k]}, the export expects {w[k]}" for k in w if k in g and g[k] != w[k]]
    return "; ".join(parts) or f"got {got}, the export expects {want}"


def check_call(manifest: dict, leaves: list, spec: pytree.TreeSpec) -> None:
    """The call's structure, constants, dtypes and static dims must be those of the export."""
    call = manifest["call"]
    expected_spec = pytree.treespec_loads(json.dumps(call["in_spec"]))
    if spec != expected_spec:
        raise ManifestMismatchError("the call does not have the exported structure: " + _spec_difference(spec, expected_spec))
    problems = []
    sizes: dict[str, tuple[int, str]] = {}  # dimension -> (size, where first seen)
    for entry, x in zip(call["leaves"], leaves):
        name = entry["name"]
        if entry["kind"] == "constant":
            if isinstance(x, torch.Tensor) or x != entry["value"] or type(x) is not type(entry["value"]):
                problems.append(f"{name}={x!r} but the export specialised {name}={entry['value']!r}")
            continue
        if not isinstance(x, torch.Tensor):
            problems.append(f"{name} is {type(x).__name__}, the export expects a tensor")
            continue
        if dtype_name(x.dtype) != entry["dtype"]:
            problems.append(f"{name} has dtype {dtype_name(x.dtype)}, the export expects {entry['dtype']}")
        shape, want = list(x.shape), entry["shape"]
        dyn = {int(a): d for a, d in entry.get("dynamic_axes", {}).items()}
        if len(shape) != len(want) or any(s != w for a, (s, w) in enumerate(zip(shape, want)) if a not in dyn):
            shown = [dyn.get(a, w) for a, w in enumerate(want)]
            problems.append(f"{name} has shape {shape}, the export expects {shown}")
            continue
        for axis, dim in sorted(dyn.items()):
            where = f"{name} axis {axis}"
            if dim in sizes and sizes[dim][0] != shape[axis]:
                problems.append(f"{where} ({dim}) is {shape[axis]}, but {sizes[dim][1]} ({dim}) is {sizes[dim][0]}: "
                                f"the export ties these axes")
            sizes.setdefault(dim, (shape[axis], where))
    limits = call.get("dims") or ({BATCH: call["batch"]} if call.get("batch") else {})
    for dim, (size, _) in sizes.items():
        lo, hi = (limits.get(dim) or {}).get("min"), (limits.get(dim) or {}).get("max")
        if (lo is not None and size < lo) or (hi is not None and size > hi):
            problems.append(f"{dim} {size} is outside the exported range [{lo}, {'inf' if hi is None else hi}]")
    if problems:
        raise ManifestMismatchError("inputs do not match the export: " + "; ".join(problems))
