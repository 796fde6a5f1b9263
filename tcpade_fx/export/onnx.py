"""Export a TC-Padé transformer to ONNX: ``compute.onnx``, ``predict.onnx`` and ``manifest.json``.

    folder = tcpade_fx.export.to_onnx(pipe, "dit-onnx", policy="balanced")
    tcpade_fx.export.load("dit-onnx").install(pipe)          # the transformer now runs in onnxruntime
    images = pipe([3, 4, 5], num_inference_steps=28).images

Why two graphs, ``compute`` and ``predict``, rather than head/body/tail pieces or one graph with an ``If``:

* The runtime (:class:`tcpade_fx.runtime.TCPadeRuntime`) needs exactly these two entry points per step:
  ``compute(*leaves) -> (*outputs, residual_fp32)`` and ``predict(*leaves, residual) -> outputs``. Exporting
  them keeps one ORT/TensorRT call per transformer call, with head and tail fused with the body in each file;
  three pieces would cost three session calls per step and ship the hidden states, the conditioning and every
  tensor that crosses the split (DiT's adaLN embedding, Flux's RoPE, ...) through host memory between them.
* The decision (stage, Padé fit, error feedback, per-CFG-branch history) stays in Python, exactly as in the
  PyTorch runtime: the exported runner reuses :class:`TCPadeRuntime` with these graphs plugged in, so the same
  policy gives the same schedule, and the graphs hold no state and no branch.
* A single file with an ONNX ``If`` (``torch.cond``) is not written. The predicted residual is computed in
  Python anyway, so an ``If`` saves no call; what it would save is the second copy of the head and tail weights
  (``predict.onnx`` is 0.41 MB next to ``compute.onnx``'s 8.9 MB for the bundled MNIST DiT, i.e. 5 %).
  Against that, ``torch.cond`` needs identical dense output strides in both branches (the predict branch has no
  residual output, so the branches would need padding outputs), hits an inductor layout bug on Wan, and has no
  Torch-TensorRT converter, so the TensorRT route could not share the file.

Shapes: the batch axis (axis 0 of every input whose first size is the example batch) is exported as the symbolic
dimension ``batch`` when torch.export accepts it, and every other axis the model leaves free as a token dimension
named after its example size (Flux: ``tokens_16`` for the image tokens and ``img_ids`` rows, ``tokens_8`` for the
text tokens and ``txt_ids`` rows); how they are found is in :mod:`tcpade_fx.passes.dynamic`. The others are
static, with the reason in the manifest (``static_axes`` of each input, and ``notes``): DiT's unpatchify and
position embedding fix its token count. Export with a batch of at least 2 (with CFG, one label is enough).
Non-tensor arguments (``return_dict=False``) are specialised in the graphs; the manifest records their values
and the runner refuses calls that pass others. The timestep input is named in the manifest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path

import torch

from ..policy import Policy, resolve_policy
from ..backends import TensorOnly
from ..backends.onnxruntime import onnx_io, ort_session
from ..passes.dynamic import BATCH, probe_size, resize_dims
from .capture import ExportCapture, capture_for_export
from .checks import exported_pair_errors, reference_outputs
from .hashing import file_sha256, weights_sha256
from .manifest import base_manifest, require_exportable_policy, write_manifest


def _export_one(cap: ExportCapture, which: str, path: Path, opset: int | None) -> None:
    gm = cap.compute if which == "compute" else cap.predict
    extra, extra_names, extra_outputs = cap.extra_io(which)
    wrapper = TensorOnly(gm, cap.leaves, cap.tensor_positions, extra=len(extra)).eval()
    args = tuple(cap.leaves[i] for i in cap.tensor_positions) + tuple(extra)
    input_names = cap.tensor_names + extra_names
    output_names = cap.output_names + extra_outputs
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping torchvision::nms" etc.
    try:
        with torch.no_grad(), open(os.devnull, "w") as devnull, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape constraint")
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            with contextlib.redirect_stdout(devnull):  # the exporter prints progress lines
                program = torch.onnx.export(
                    wrapper, args, dynamo=True, input_names=input_names, output_names=output_names,
                    dynamic_shapes=cap.dynamic_shapes(cap.export_dims(), residual=which == "predict",
                                                      gate=which == "predict" and cap.input_gate),
                    opset_version=opset, optimize=True, verbose=False,
                )
    finally:
        registration.setLevel(level)
    program.save(str(path))


def _run(session, names: list[str], tensors) -> list[torch.Tensor]:
    wanted = {i.name for i in session.get_inputs()}
    feeds = {n: t.detach().cpu().contiguous().numpy() for n, t in zip(names, tensors) if n in wanted}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


def _check(cap: ExportCapture, folder: Path, tolerance: float) -> dict:
    """ORT vs PyTorch on the example call; for a dynamic batch also at batch 1 and batch + 1, for dynamic token
    axes also with every token dimension at :func:`~tcpade_fx.passes.dynamic.probe_size` of its example (example batch)."""
    compute = ort_session(folder / "compute.onnx", threads=1)
    predict = ort_session(folder / "predict.onnx", threads=1)
    names = cap.tensor_names
    runs: list[dict] = [{}]
    if cap.batch_leaves:
        runs += [{BATCH: 1}, {BATCH: cap.batch_size + 1}]
    if cap.token_dims:  # dimensions of equal example size go to different sizes (24, 25, ...): none are tied
        examples = [cap.dims[n]["example"] for n in cap.token_dims]
        runs.append({n: probe_size(e) + examples[:k].count(e)
                     for k, (n, e) in enumerate(zip(cap.token_dims, examples))})
    report: dict = {"tolerance": tolerance, "batches": []}
    predict_names = names + cap.extra_io("predict")[1]
    for sizes in runs:
        size = sizes.get(BATCH, cap.batch_size)
        leaves = resize_dims(cap.leaves, cap.dynamic_axes, sizes) if sizes else cap.leaves
        ref = reference_outputs(cap.module, leaves, cap.in_spec)
        tensors = [leaves[i] for i in cap.tensor_positions]
        errs = exported_pair_errors(cap.input_gate, cap.compute, cap.predict, leaves, ref,
                                    lambda: _run(compute, names, tensors),
                                    lambda *extra: _run(predict, predict_names, tensors + list(extra)))
        tokens = {n: v for n, v in sizes.items() if n != BATCH}
        report["batches"].append({"batch": size, **({"dims": tokens} if tokens else {}), **errs})
        if not max(errs.values()) <= tolerance:
            where = f"batch {size}" + "".join(f", {n} = {v}" for n, v in tokens.items())
            raise RuntimeError(
                f"the exported ONNX graphs differ from the PyTorch transformer at {where}: {errs} (relative, "
                f"allowed {tolerance:g}); the export in {folder} is not usable"
            )
    return report


def to_onnx(
    target,
    out_dir: str | os.PathLike,
    example_call=None,
    policy: Policy | str = "balanced",
    *,
    dynamic_batch: bool = True,
    dynamic_tokens: bool = True,
    opset: int | None = None,
    check: bool = True,
    tolerance: float | None = None,
    block_prefixes: tuple[str, ...] | None = None,
) -> Path:
    """Write ``compute.onnx``, ``predict.onnx`` and ``manifest.json`` for a pipeline's transformer (or a bare one).

    Args:
        target: a diffusers pipeline with a ``.transformer``, or the transformer.
        out_dir: folder to write (created; existing files of the same names are replaced).
        example_call: for a pipeline, a dict of pipeline kwargs (it is run until its first transformer call,
            whose inputs fix the exported shapes); for a transformer, its kwargs or ``(args, kwargs)``. ``None``
            works for the bundled MNIST pipelines.
        policy: the TC-Padé policy the runner uses by default (recorded in the manifest; the graphs do not
            depend on it).
        dynamic_batch: keep the batch axis symbolic (when torch.export accepts it; the manifest notes otherwise).
        dynamic_tokens: keep the other axes the model leaves free symbolic too (token counts: Flux's image and
            text tokens; DiT fixes its own). Axes that must stay equal share one dimension.
        opset: ONNX opset (default: the exporter's).
        check: run both graphs in onnxruntime against the PyTorch transformer (example batch, 1, batch + 1,
            and every token dimension at 1.5 x its example size).
        tolerance: relative error allowed by the check (default 1e-4 for float32, 2e-2 otherwise).
        block_prefixes: names of the block ModuleList(s) when the model is not a known family.

    Returns the folder. Load it with :func:`tcpade_fx.export.load`.
    """
    policy = require_exportable_policy(resolve_policy(policy))
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    cap = capture_for_export(target, example_call, dynamic_batch=dynamic_batch, dynamic_tokens=dynamic_tokens,
                             block_prefixes=block_prefixes, input_gate=policy.input_gate, per_sample=policy.per_sample)
    manifest = base_manifest(cap, policy, "onnx", weights_sha256(cap.module))
    opsets = set()
    for which in ("compute", "predict"):
        path = folder / f"{which}.onnx"
        for stale in (path, folder / f"{path.name}.data"):
            stale.unlink(missing_ok=True)
        _export_one(cap, which, path, opset)
        inputs, outputs, found_opset = onnx_io(path)
        opsets.add(found_opset)
        entry = {"file": path.name, "sha256": file_sha256(path), "inputs": inputs, "outputs": outputs}
        data = folder / f"{path.name}.data"
        if data.exists():
            entry["external_data"] = {"file": data.name, "sha256": file_sha256(data)}
        manifest["graphs"][which] = entry
    call = manifest["call"]
    manifest["onnx"] = {
        "opset": sorted(opsets)[0] if len(opsets) == 1 else sorted(opsets),
        "exporter": "torch.onnx.export(dynamo=True, optimize=True)",
        # torch.onnx's classic dynamic_axes form: input -> {axis: dimension}
        "dynamic_axes": {e["name"]: e["dynamic_axes"] for e in [*call["leaves"], call["residual"],
                                                                 *call.get("input_gate", {}).values()]
                         if e.get("dynamic_axes")},
    }
    if check:
        dtype = cap.residual.dtype if not cap.tensor_positions else cap.leaves[cap.tensor_positions[0]].dtype
        tol = tolerance if tolerance is not None else (1e-4 if dtype == torch.float32 else 2e-2)
        manifest["verification"] = _check(cap, folder, tol)
    write_manifest(folder, manifest)
    return folder
