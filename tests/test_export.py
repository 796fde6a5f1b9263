"""Export: ONNX files + manifest, the onnxruntime runner against the PyTorch runtime, refusals, TensorRT paths.

The bundled mnist-dit weights may be replaced while these tests run (training overwrites them): every
comparison is between runs of the same loaded weights, never against stored numbers.
"""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils import _pytree as pytree

import tcpade_fx
import tcpade_fx.models
from tcpade_fx.export import ManifestMismatchError, TensorRTUnavailableError, load, to_onnx, to_tensorrt
from tcpade_fx.export.capture import capture_for_export
from tcpade_fx.export.checks import graph_errors
from tcpade_fx.export.hashing import weights_sha256
from tcpade_fx.passes.dynamic import resize_batch
from tcpade_fx.export.tensorrt import prepare_tensorrt_export, require_tensorrt
from tcpade_fx.metrics import psnr, seeded_latents

pytest.importorskip("onnxruntime")


def _trt_available() -> tuple[bool, str]:
    try:
        require_tensorrt()
    except TensorRTUnavailableError as exc:
        return False, str(exc)
    return True, ""


TRT_OK, TRT_WHY = _trt_available()
needs_trt = pytest.mark.skipif(not TRT_OK, reason=f"needs CUDA and torch_tensorrt: {TRT_WHY[:200]}")


@pytest.fixture(scope="module")
def pipe():
    return tcpade_fx.models.load("mnist-dit")


@pytest.fixture(scope="module")
def exported(pipe, tmp_path_factory):
    return to_onnx(pipe, tmp_path_factory.mktemp("dit-onnx"), policy="balanced")


def _copy(folder, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def _edit_manifest(folder, edit):
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


# -- what is written ----------------------------------------------------------------------------------------
def test_folder_holds_onnx_and_json_only(exported):
    assert sorted(p.name for p in exported.iterdir()) == ["compute.onnx", "manifest.json", "predict.onnx"]


def test_manifest_describes_the_call(exported, pipe):
    m = json.loads((exported / "manifest.json").read_text())
    assert m["library_version"] == tcpade_fx.__version__
    assert m["backend"] == "onnx" and m["onnx"]["opset"] >= 17
    assert m["policy"] == json.loads(json.dumps(vars(tcpade_fx.Policy.preset("balanced"))))
    assert m["weights_sha256"] == weights_sha256(pipe.transformer)
    call = m["call"]
    assert call["timestep_input"] == "timestep"
    by_name = {e["name"]: e for e in call["leaves"]}
    assert by_name["return_dict"] == {"index": 3, "name": "return_dict", "kind": "constant", "value": False}
    assert by_name["hidden_states"]["shape"][1:] == [1, 28, 28] and by_name["hidden_states"]["dynamic_axes"] == {
        "0": "batch"}
    assert by_name["class_labels"]["dtype"] == "int64"
    spec = pytree.treespec_loads(json.dumps(call["in_spec"]))
    assert spec.num_leaves == len(call["leaves"])
    compute, predict = m["graphs"]["compute"], m["graphs"]["predict"]
    assert [i["name"] for i in compute["inputs"]] == ["hidden_states", "timestep", "class_labels"]
    assert [i["name"] for i in predict["inputs"]][-1] == "tcpade_residual"
    assert compute["inputs"][0]["shape"] == ["batch", 1, 28, 28]
    assert compute["outputs"][-1] == {"name": "tcpade_residual", "dtype": "float32", "shape": ["batch", 49, 128]}
    assert [b["batch"] for b in m["verification"]["batches"]] == [4, 1, 5]


def test_dit_token_axes_are_static_with_a_reason(exported):
    """mnist-dit fixes its token count (position embedding of a fixed sample size): only the batch is dynamic."""
    m = json.loads((exported / "manifest.json").read_text())
    call = m["call"]
    assert call["dims"] == {"batch": {"example": 4, "min": 1, "max": 4096}}
    hs = {e["name"]: e for e in call["leaves"]}["hidden_states"]
    assert hs["dynamic_axes"] == {"0": "batch"} and sorted(hs["static_axes"]) == ["1", "2", "3"]
    assert "specialises sizes 0 and 1" in hs["static_axes"]["1"]  # one channel
    # height and width: free symbols in the Dim.AUTO capture, but pinned by its guards ((h // 4) == 7)
    assert all(hs["static_axes"][a].startswith("fixed by the model") for a in ("2", "3"))
    assert "hidden_states[2]" in hs["static_axes"]["2"] and "false at size 42" in hs["static_axes"]["2"]
    assert call["residual"]["dynamic_axes"] == {"0": "batch"}
    assert any(n.startswith("static axes hidden_states[2]") and "fixed by the model" in n for n in m["notes"])
    assert m["onnx"]["dynamic_axes"]["hidden_states"] == {"0": "batch"}


# -- the runner matches the PyTorch runtime -----------------------------------------------------------------
def test_onnxruntime_tcpade_matches_pytorch_tcpade(exported, pipe):
    labels, steps = [0, 3, 7], 20
    latents = seeded_latents([11, 12, 13])
    tcpade_fx.compile(pipe, policy="balanced")
    try:
        ref = pipe(labels, latents=latents.clone(), num_inference_steps=steps, output_type="pt").images
        ref_schedule = pipe.tcpade.stats.decisions(0)
    finally:
        tcpade_fx.disable(pipe)
    runner = load(exported, threads=1)
    runner.install(pipe)
    try:
        got = pipe(labels, latents=latents.clone(), num_inference_steps=steps, output_type="pt").images
        stats = pipe.tcpade.stats
        # dynamic batch: one label, and no CFG (batch 1), through the same graphs
        one = pipe([5], latents=latents[:1].clone(), num_inference_steps=6, guidance_scale=1.0, output_type="pt")
    finally:
        tcpade_fx.disable(pipe)
    assert psnr(ref, got) >= 40.0
    assert stats.decisions(0) == ref_schedule and 0 < stats.predicted
    assert one.images.shape == (1, 1, 28, 28) and torch.isfinite(one.images).all()


def test_policy_full_runs_every_step(exported, pipe):
    runner = load(exported, policy="full", allow_policy_change=True, threads=1)
    runner.install(pipe)
    try:
        pipe([1], latents=seeded_latents([1]), num_inference_steps=5, output_type="pt")
        assert pipe.tcpade.stats.decisions(0) == "CCCCC"
    finally:
        tcpade_fx.disable(pipe)


# -- refusals -----------------------------------------------------------------------------------------------
def test_refuses_other_library_version(exported, tmp_path):
    folder = _copy(exported, tmp_path)
    _edit_manifest(folder, lambda m: m.update(library_version="0.0.1"))
    with pytest.raises(ManifestMismatchError, match=r"0\.0\.1.*" + tcpade_fx.__version__.replace(".", r"\.")):
        load(folder)


def test_refuses_policy_fields_that_do_not_match(exported, tmp_path):
    folder = _copy(exported, tmp_path)
    _edit_manifest(folder, lambda m: m["policy"].update(mid_tolerance=0.5))
    with pytest.raises(ManifestMismatchError, match="mid_tolerance"):
        load(folder)
    _edit_manifest(folder, lambda m: (m["policy"].pop("mid_tolerance"), m["policy"].update(warp=1)))
    with pytest.raises(ManifestMismatchError, match=r"missing \['mid_tolerance'\], unknown \['warp'\]"):
        load(folder)


def test_refuses_a_different_requested_policy_unless_allowed(exported):
    with pytest.raises(ManifestMismatchError, match="compute_budget"):
        load(exported, policy="fast")
    assert load(exported, policy="fast", allow_policy_change=True).policy.name == "fast"
    assert load(exported, policy="balanced").policy.name == "balanced"


def test_a_quality_export_keeps_its_unlimited_gap_span(exported, tmp_path):
    """"quality" corrects every gap (gap_span_limit=inf): the manifest's JSON must carry the infinity back."""
    import dataclasses
    import math

    quality = tcpade_fx.Policy.preset("quality")
    folder = _copy(exported, tmp_path)
    _edit_manifest(folder, lambda m: m.update(policy=dataclasses.asdict(quality)))
    loaded = load(folder, policy="quality", threads=1).policy
    assert loaded == quality and loaded.name == "quality" and loaded.gap_span_limit == math.inf


def test_refuses_a_module_granularity_policy_even_when_policy_changes_are_allowed(exported):
    modules = tcpade_fx.Policy.preset("balanced").replace(granularity="modules")
    with pytest.raises(ValueError, match="granularity='stack'"):
        load(exported, policy=modules, allow_policy_change=True)


def test_refuses_changed_graph_files_and_declared_shapes(exported, tmp_path):
    folder = _copy(exported, tmp_path)
    with open(folder / "predict.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestMismatchError, match="predict.onnx has sha256"):
        load(folder)
    folder = _copy(exported, tmp_path / "b")
    _edit_manifest(folder, lambda m: m["graphs"]["compute"]["inputs"][0].update(shape=["batch", 1, 32, 32]))
    with pytest.raises(ManifestMismatchError, match=r"hidden_states: shape \['batch', 1, 28, 28\]"):
        load(folder)


def test_refuses_calls_that_do_not_match_the_export(exported, pipe):
    runner = load(exported, threads=1)
    transformer = pipe.transformer
    runner.install(transformer)
    try:
        kw = dict(hidden_states=torch.randn(2, 1, 32, 32), timestep=torch.full((2,), 500.0),
                  class_labels=torch.tensor([1, 2]), return_dict=False)
        with pytest.raises(ManifestMismatchError, match=r"hidden_states has shape \[2, 1, 32, 32\]"):
            transformer(**kw)
        kw["hidden_states"] = torch.randn(2, 1, 28, 28)
        with pytest.raises(ManifestMismatchError, match="return_dict=True"):
            transformer(**{**kw, "return_dict": True})
        with pytest.raises(ManifestMismatchError, match="class_labels has dtype int32"):
            transformer(**{**kw, "class_labels": kw["class_labels"].int()})
        assert transformer(**kw)[0].shape == (2, 1, 28, 28)
    finally:
        tcpade_fx.disable(transformer)


def test_refuses_other_weights(exported, tmp_path):
    other = tcpade_fx.models.load("mnist-dit")
    with torch.no_grad():
        next(other.transformer.parameters()).add_(1.0)
    with pytest.raises(ManifestMismatchError, match="weights"):
        load(exported).install(other)
    load(exported).install(other, check_weights=False)
    assert other.tcpade is not None


def test_nothing_is_unpickled(exported, pipe, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("unpickling during load/sample")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    runner = load(exported, threads=1)
    runner.install(pipe)
    try:
        pipe([2], latents=seeded_latents([2]), num_inference_steps=3, output_type="pt")
    finally:
        tcpade_fx.disable(pipe)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """A tiny Flux transformer exported bare with 16 image and 8 text tokens (distinct sizes: axes of equal
    example size would be tied)."""
    from tcpade_fx.testing import tiny_flux

    model, kw = tiny_flux(batch=2, image_tokens=16, text_tokens=8)
    return model, to_onnx(model, tmp_path_factory.mktemp("flux-onnx"), example_call=kw)


@pytest.mark.slow
def test_flux_manifest_lists_dynamic_token_axes(flux):
    _, folder = flux
    m = json.loads((folder / "manifest.json").read_text())
    leaves = {e["name"]: e for e in m["call"]["leaves"]}
    assert leaves["hidden_states"]["dynamic_axes"] == {"0": "batch", "1": "tokens_16"}
    assert leaves["img_ids"]["dynamic_axes"] == {"0": "tokens_16"}
    assert leaves["encoder_hidden_states"]["dynamic_axes"] == {"0": "batch", "1": "tokens_8"}
    assert leaves["txt_ids"]["dynamic_axes"] == {"0": "tokens_8"}
    assert leaves["pooled_projections"]["dynamic_axes"] == {"0": "batch"}
    # channels (8, like the text tokens) and the 3 id columns stay static, with the reason
    assert "fixed by the model" in leaves["hidden_states"]["static_axes"]["2"]
    assert "fixed by the model" in leaves["img_ids"]["static_axes"]["1"]
    assert m["call"]["residual"]["dynamic_axes"] == {"0": "batch", "1": "tokens_16"}
    assert set(m["call"]["dims"]) == {"batch", "tokens_16", "tokens_8"}
    assert m["graphs"]["compute"]["inputs"][0]["shape"] == ["batch", "tokens_16", 8]
    assert m["graphs"]["predict"]["inputs"][-1]["shape"] == ["batch", "tokens_16", 32]
    assert m["verification"]["batches"][-1]["dims"] == {"tokens_16": 24, "tokens_8": 12}
    assert any(n.startswith("dynamic axis tokens_16") and "img_ids[0]" in n for n in m["notes"])


@pytest.mark.slow
def test_flux_export_runs_at_other_token_counts(flux):
    """Exported at 16 image / 8 text tokens, run at 36 / 12 (and batch 3): same outputs as PyTorch."""
    from tcpade_fx.passes import flatten_call
    from tcpade_fx.testing import tiny_flux

    model, folder = flux
    _, kw = tiny_flux(batch=3, seed=1, image_tokens=36, text_tokens=12)
    assert kw["img_ids"].shape == (36, 3) and kw["hidden_states"].shape == (3, 36, 8)
    runner = load(folder, threads=1)
    leaves, spec = flatten_call((), kw, runner.in_spec)
    graphs = runner.graphs_for(kw)  # the runner's shape check accepts the new token counts
    with torch.no_grad():
        ref = model(**kw)[0]
    out, residual = graphs.compute(*leaves)
    pred = graphs.predict(*leaves, residual)[0]
    assert out.shape == ref.shape == (3, 36, 8) and residual.shape == (3, 36, 32)
    assert float((out - ref).norm() / ref.norm()) < 1e-4
    assert float((pred - ref).norm() / ref.norm()) < 1e-4
    # through the installed runner (policy "full": every step computed, so each output is the model's)
    times = [0.9, 0.7, 0.5]
    with torch.no_grad():
        want = [model(**{**kw, "timestep": torch.full((3,), t)})[0] for t in times]
    load(folder, policy="full", allow_policy_change=True, threads=1).install(model)
    try:
        model.tcpade.begin(len(times))
        got = [model(**{**kw, "timestep": torch.full((3,), t)})[0] for t in times]
    finally:
        tcpade_fx.disable(model)
    assert max(float((a - b).norm() / b.norm()) for a, b in zip(got, want)) < 1e-4


@pytest.mark.slow
def test_flux_runner_refuses_wrong_static_dims_and_untied_tokens(flux):
    from tcpade_fx.testing import tiny_flux

    model, folder = flux
    runner = load(folder, threads=1)
    _, kw = tiny_flux(batch=2, seed=1, image_tokens=36, text_tokens=12)
    with pytest.raises(ManifestMismatchError, match=r"hidden_states has shape \[2, 36, 9\], the export expects "
                                                    r"\['batch', 'tokens_16', 8\]"):
        runner.graphs_for({**kw, "hidden_states": torch.randn(2, 36, 9)})
    with pytest.raises(ManifestMismatchError, match=r"img_ids axis 0 \(tokens_16\) is 25, but hidden_states axis 1"):
        runner.graphs_for({**kw, "img_ids": kw["img_ids"][:25]})
    with pytest.raises(ManifestMismatchError, match=r"txt_ids has shape \[12, 2\]"):
        runner.graphs_for({**kw, "txt_ids": torch.zeros(12, 2)})
    runner.graphs_for(kw)


@pytest.mark.slow
def test_flux_equal_token_counts_are_not_tied():
    """16 image and 16 text tokens: grouping by size alone would tie them; the guards keep them apart."""
    from tcpade_fx.testing import tiny_flux

    model, kw = tiny_flux(batch=2, image_tokens=16, text_tokens=16)
    cap = capture_for_export(model, kw)
    axes = {cap.leaf_names[i]: v for i, v in cap.dynamic_axes.items()}
    assert axes["hidden_states"] == {0: "batch", 1: "tokens_16"} and axes["img_ids"] == {0: "tokens_16"}
    assert axes["encoder_hidden_states"] == {0: "batch", 1: "tokens_16_b"} and axes["txt_ids"] == {0: "tokens_16_b"}
    assert cap.residual_axes == {0: ("batch", 1, 0), 1: ("tokens_16", 1, 0)}  # the image stream's residual


@pytest.mark.slow
def test_bare_flux_transformer_roundtrip(flux):
    """A second family, exported bare: several batch inputs, batch-free ids, dynamic batch, same schedule."""
    from tcpade_fx.testing import tiny_flux

    model, folder = flux
    _, kw3 = tiny_flux(batch=3, seed=1)
    times = [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]  # >= Policy.min_steps: cached

    def trajectory():
        model.tcpade.begin(len(times))
        return [model(**{**kw3, "timestep": torch.full((3,), t)})[0] for t in times]

    load(folder, threads=1).install(model)
    got, got_schedule = trajectory(), model.tcpade.stats.decisions(0)
    tcpade_fx.disable(model)
    tcpade_fx.compile(model, policy="balanced")
    ref, ref_schedule = trajectory(), model.tcpade.stats.decisions(0)
    tcpade_fx.disable(model)
    assert got_schedule == ref_schedule and "." in ref_schedule
    assert max(float((a - b).norm() / b.norm()) for a, b in zip(got, ref)) < 1e-4


def test_bare_transformer_needs_example_call():
    from tcpade_fx.testing import tiny_dit

    transformer, _ = tiny_dit()
    with pytest.raises(TypeError, match="example_call"):
        to_onnx(transformer, "/nonexistent-never-written")


# -- TensorRT -----------------------------------------------------------------------------------------------
@pytest.mark.skipif(TRT_OK, reason="TensorRT is available here: the missing-dependency error cannot occur")
def test_require_tensorrt_says_what_to_install():
    with pytest.raises(TensorRTUnavailableError) as info:
        require_tensorrt()
    message = str(info.value)
    assert "torch-tensorrt==" in message and "CUDA" in message and "to_onnx" in message


@pytest.mark.skipif(TRT_OK, reason="TensorRT is available here: the missing-dependency error cannot occur")
def test_tensorrt_entry_points_fail_clearly_without_it(pipe, tmp_path):
    with pytest.raises(TensorRTUnavailableError, match="torch-tensorrt"):
        to_tensorrt(pipe, tmp_path / "trt")
    assert not (tmp_path / "trt").exists()
    with pytest.raises(TensorRTUnavailableError):
        tcpade_fx.compile(tcpade_fx.models.load("mnist-dit"), backend="tensorrt")


def test_tensorrt_export_torch_side_on_cpu(pipe):
    """Everything to_tensorrt does before the converter: dynamic-batch programs and Input ranges."""
    cap = capture_for_export(pipe, dynamic_tokens=False)  # as to_tensorrt captures
    prepared = prepare_tensorrt_export(cap, min_batch=1, max_batch=16)
    compute, predict = prepared["compute"], prepared["predict"]
    assert compute.input_names == ["hidden_states", "timestep", "class_labels"]
    assert predict.input_names[-1] == "tcpade_residual" and compute.output_names[-1] == "tcpade_residual"
    assert compute.shapes[0]["min"] == [1, 1, 28, 28] and compute.shapes[0]["max"] == [16, 1, 28, 28]
    assert predict.shapes[-1]["opt"] == [cap.batch_size, 49, 128]
    leaves = resize_batch(cap.leaves, cap.batch_leaves, 3)
    tensors = [leaves[i] for i in cap.tensor_positions]
    with torch.no_grad():
        want = cap.compute(*leaves)
        got = compute.exported.module()(*tensors)
        pred = predict.exported.module()(*tensors, want[-1])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(want, got))
    assert torch.allclose(pred[0], want[0], rtol=1e-3, atol=1e-4)


@needs_trt
def test_to_tensorrt_roundtrip(tmp_path):
    pipe = tcpade_fx.models.load("mnist-dit", device="cuda")
    folder = to_tensorrt(pipe, tmp_path / "trt")
    assert sorted(p.name for p in folder.iterdir()) == ["compute.engine", "manifest.json", "predict.engine"]
    latents = seeded_latents([1, 2])
    tcpade_fx.compile(pipe, policy="balanced")
    ref = pipe([1, 2], latents=latents.clone(), num_inference_steps=20, output_type="pt").images
    tcpade_fx.disable(pipe)
    load(folder).install(pipe)
    got = pipe([1, 2], latents=latents.clone(), num_inference_steps=20, output_type="pt").images
    assert psnr(ref.cpu(), got.cpu()) >= 30.0


@needs_trt
def test_backend_tensorrt_compiles_each_graph_once():
    pipe = tcpade_fx.compile(tcpade_fx.models.load("mnist-dit", device="cuda"), backend="tensorrt")
    pipe([1, 2], num_inference_steps=12, output_type="pt")
    assert pipe.tcpade.stats.compiles == {"compute": 1, "predict": 1}


@settings(max_examples=40, deadline=None)
@given(n_out=st.integers(1, 3), wrong=st.data(), scale=st.floats(1e-3, 1.0))
def test_the_export_check_compares_the_predict_graph_too(n_out, wrong, scale):
    g = torch.Generator().manual_seed(n_out)
    ref = [torch.randn(2, 5, generator=g) for _ in range(n_out)]
    k = wrong.draw(st.integers(0, n_out - 1))
    pred = [r.clone() for r in ref]
    pred[k] = pred[k] + scale * ref[k].norm() / ref[k].numel() ** 0.5
    errs = graph_errors(ref, [r.clone() for r in ref], pred)
    assert errs["compute"] == 0.0
    assert errs["predict_true_residual"] > 0.5 * scale
    with pytest.raises(RuntimeError, match="predict graph returned"):
        graph_errors(ref, ref, pred[:-1] if n_out > 1 else [])
