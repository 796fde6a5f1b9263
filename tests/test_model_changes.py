"""Model changes after the first call are followed, never ignored: LoRA attached, scaled, disabled, fused,
unfused or deleted, a Parameter replaced, a submodule replaced; in-place weight updates need no re-capture.

Two identical tiny Flux pipelines get the same changes; the compiled one under "full" must equal the other."""

from __future__ import annotations

import pytest
import torch

import tcpade_fx
from tcpade_fx.testing_pipelines import output_of, tiny_flux_pipeline

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")


def _run(pipe, kwargs) -> torch.Tensor:
    return output_of(pipe(**kwargs, num_inference_steps=6, generator=torch.Generator().manual_seed(0)))


def _add_lora(t):
    t.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"],
                                  init_lora_weights=False), adapter_name="a")


def _assign_new_parameters(t):
    t.load_state_dict({k: v + 0.01 for k, v in t.state_dict().items() if k.startswith("proj_out")},
                      strict=False, assign=True)


def _replace_submodule(t):
    t.proj_out = torch.nn.Linear(t.proj_out.in_features, t.proj_out.out_features)


CHANGES = [  # (what, change, whether a re-capture is needed)
    ("LoRA attached after the first call", _add_lora, True),
    ("set_adapters(weights=0.5)", lambda t: t.set_adapters(["a"], weights=[0.5]), True),
    ("disable_adapters", lambda t: t.disable_adapters(), True),
    ("enable_adapters", lambda t: t.enable_adapters(), True),
    ("fuse_lora", lambda t: t.fuse_lora(), True),
    ("unfuse_lora", lambda t: t.unfuse_lora(), True),
    ("delete_adapters", lambda t: t.delete_adapters("a"), True),
    ("load_state_dict(assign=True)", _assign_new_parameters, True),
    ("a replaced submodule", _replace_submodule, True),
    ("an in-place weight update", lambda t: t.proj_out.weight.data.mul_(1.1), False),
]


def test_every_model_change_gives_full_equal_to_the_uncompiled_pipeline():
    compiled, kwargs = tiny_flux_pipeline()
    plain, _ = tiny_flux_pipeline()
    tcpade_fx.compile(compiled, "full")
    assert torch.equal(_run(compiled, kwargs), _run(plain, kwargs))
    for what, change, recaptures in CHANGES:
        for pipe in (compiled, plain):
            torch.manual_seed(1)
            change(pipe.transformer)
        assert torch.equal(_run(compiled, kwargs), _run(plain, kwargs)), what
        stats = compiled.tcpade.stats
        assert stats.captures == int(recaptures), (what, stats.notes)
        noted = any("model changed since the graphs were captured" in n for n in stats.notes)
        assert noted == recaptures, (what, stats.notes)


def test_a_lora_scale_change_is_named_in_the_note():
    pipe, kwargs = tiny_flux_pipeline()
    _add_lora(pipe.transformer)
    tcpade_fx.compile(pipe, "balanced")
    kwargs = {**kwargs, "num_inference_steps": 12}
    pipe(**kwargs)
    pipe.transformer.set_adapters(["a"], weights=[0.3])
    pipe(**kwargs)
    assert any("PEFT adapters" in n for n in pipe.tcpade.stats.notes), pipe.tcpade.stats.notes
    assert pipe.tcpade.stats.predicted > 0


def test_exported_graphs_refuse_a_model_that_changed(tmp_path):
    pytest.importorskip("onnxruntime")
    from tcpade_fx.export import load, to_onnx

    pipe, kwargs = tiny_flux_pipeline()
    folder = to_onnx(pipe, tmp_path / "flux", example_call={**kwargs, "num_inference_steps": 2})
    load(folder, policy="full", allow_policy_change=True).install(pipe)
    _run(pipe, kwargs)
    _add_lora(pipe.transformer)
    with pytest.raises(RuntimeError, match="changed since the exported graphs were installed.*Export again"):
        _run(pipe, kwargs)
