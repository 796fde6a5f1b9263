"""Unit tests of the graph passes (capture → locate → split → verify → rewrite) on the five tiny transformers.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from torch import nn

import tcpade_fx
from tcpade_fx.passes import (
    RESIDUAL_INPUT,
    UnsupportedModelError,
    VerificationError,
    build_compute_graph,
    build_predict_graph,
    capture_graph,
    locate_block_stack,
    split_head_body_tail,
    verify_rewrite,
    verify_split,
)
from tcpade_fx.passes.locate import PATCH_EMBEDDERS
from tcpade_fx.passes.verify import relative_difference
from tcpade_fx.testing import TINY_TRANSFORMERS, tiny_flux

FAMILIES = sorted(TINY_TRANSFORMERS)

#: What locate must find per family: block ModuleLists, number of blocks, the embedder behind the residual input.
EXPECTED = {
    "dit": (("transformer_blocks",), 2, "pos_embed"),
    "flux": (("single_transformer_blocks", "transformer_blocks"), 4, "x_embedder"),
    "wan": (("blocks",), 2, "patch_embedding"),
    "sd3": (("transformer_blocks",), 2, "pos_embed"),
    "pixart": (("transformer_blocks",), 2, "pos_embed"),
}
_BLOCK = re.compile(r"^(?:.*\.)?(transformer_blocks|single_transformer_blocks|blocks)\.(\d+)$")


@dataclasses.dataclass
class Case:
    module: nn.Module
    kwargs: dict
    gm: torch.fx.GraphModule
    leaves: list
    plan: object


_CASES: dict[str, Case] = {}


def case(family: str) -> Case:
    """Capture each family once per session (export costs about a second)."""
    if family not in _CASES:
        module, kwargs = TINY_TRANSFORMERS[family]()
        captured = capture_graph(module, (), kwargs)
        gm = captured.graph_module
        _CASES[family] = Case(module, kwargs, gm, captured.example_leaves, locate_block_stack(gm))
    return _CASES[family]


def stack_paths(node: torch.fx.Node) -> list[str]:
    return [entry[0] for entry in (node.meta.get("nn_module_stack") or {}).values()]


def node(gm: torch.fx.GraphModule, name: str) -> torch.fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def producer_stack(n: torch.fx.Node) -> list[str]:
    """Module paths of the first producer of ``n`` (through views/casts) that ran inside a named module."""
    for _ in range(16):
        paths = [p for p in stack_paths(n) if p]
        if paths:
            return paths
        n = [a for a in n.all_input_nodes if a.op != "get_attr"][0]
    return []


def tensors(out) -> list[torch.Tensor]:
    return [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]


# -- capture ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_capture_reproduces_the_module(family):
    c = case(family)
    with torch.no_grad():
        ref = tensors(c.module(**c.kwargs))
        got = tensors(c.gm(*c.leaves))
    assert len(ref) == len(got) == 1
    assert torch.equal(ref[0], got[0])


# -- locate -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_locate_finds_the_block_stack(family):
    c = case(family)
    prefixes, num_blocks, embedder = EXPECTED[family]
    plan = c.plan
    assert plan.prefixes == prefixes
    assert plan.num_blocks == num_blocks
    # every op that ran directly inside a block is in the body
    for n in c.gm.graph.nodes:
        if any(_BLOCK.match(p) for p in stack_paths(n)):
            assert n.name in plan.body_nodes, n.name
    # the body output is produced in the last block, the residual input by the patch embedder and outside the body
    out = node(c.gm, plan.body_output)
    last = f"{prefixes[0]}.{num_blocks - 1}" if family != "flux" else "single_transformer_blocks.1"
    assert any(p.endswith(last) for p in stack_paths(out)), stack_paths(out)
    h_in = node(c.gm, plan.body_input)
    assert plan.body_input not in plan.body_nodes
    assert embedder in producer_stack(h_in)[-1].split("."), producer_stack(h_in)
    assert tuple(h_in.meta["val"].shape) == tuple(out.meta["val"].shape)
    # the body reads its residual input, and only the body output crosses to the tail
    body = {n for n in c.gm.graph.nodes if n.name in plan.body_nodes}
    assert any(h_in in n.all_input_nodes for n in body)
    assert [n.name for n in body if any(u not in body for u in n.users)] == [plan.body_output]


def test_locate_dit_keeps_the_after_loop_embedding_out_of_the_body():
    """DiT calls transformer_blocks[0].norm1.emb after the block loop: those ops belong to the tail."""
    c = case("dit")
    order = {n: i for i, n in enumerate(c.gm.graph.nodes)}
    out = node(c.gm, c.plan.body_output)
    emb = [n for n in c.gm.graph.nodes if any("transformer_blocks.0.norm1.emb" in p for p in stack_paths(n))]
    after = [n for n in emb if order[n] > order[out]]
    inside = [n for n in emb if order[n] < order[out]]
    assert after and inside  # the trap is really there
    assert not any(n.name in c.plan.body_nodes for n in after)
    assert all(n.name in c.plan.body_nodes for n in inside)


def test_locate_flux_picks_the_image_stream_when_text_and_image_token_counts_match():
    """Shape alone is ambiguous when text tokens = image tokens; the patch embedder decides."""
    module, kwargs = tiny_flux(image_tokens=16, text_tokens=16)
    gm = capture_graph(module, (), kwargs).graph_module
    plan = locate_block_stack(gm)
    assert "x_embedder" in producer_stack(node(gm, plan.body_input))[-1]
    assert "context_embedder" not in producer_stack(node(gm, plan.body_input))[-1]


# -- split --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_split_equals_original_bit_for_bit(family):
    c = case(family)
    split = split_head_body_tail(c.gm, c.plan)
    calls = [n.target for n in split.graph.nodes if n.op == "call_module"]
    assert calls == ["submod_0", "submod_1", "submod_2"]
    with torch.no_grad():
        ref, got = tensors(c.gm(*c.leaves)), tensors(split(*c.leaves))
    assert len(ref) == len(got) and all(torch.equal(r, g) for r, g in zip(ref, got))
    verify_split(c.gm, split, c.leaves)  # and the pass's own check agrees


# -- rewrite ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_compute_graph_equals_original_and_returns_the_residual(family):
    c = case(family)
    compute = build_compute_graph(c.gm, c.plan)
    with torch.no_grad():
        ref = tensors(c.gm(*c.leaves))
        *outs, residual = compute(*c.leaves)
    assert all(torch.equal(r, o) for r, o in zip(ref, tensors(outs)))
    assert residual.dtype == torch.float32 and residual.is_contiguous()
    assert tuple(residual.shape) == tuple(node(c.gm, c.plan.body_output).meta["val"].shape)
    assert torch.isfinite(residual).all() and residual.abs().max() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_predict_graph_fed_the_true_residual_matches(family):
    c = case(family)
    compute, predict = build_compute_graph(c.gm, c.plan), build_predict_graph(c.gm, c.plan)
    with torch.no_grad():
        ref = tensors(c.gm(*c.leaves))
        *_, residual = compute(*c.leaves)
        pred = tensors(predict(*c.leaves, residual))
        wrong = tensors(predict(*c.leaves, torch.zeros_like(residual)))
    assert len(pred) == len(ref)
    assert max(relative_difference(r, p) for r, p in zip(ref, pred)) < 1e-5
    assert relative_difference(ref[0], wrong[0]) > 1e-3  # the output really depends on the residual input
    assert verify_rewrite(c.gm, compute, predict, c.leaves, c.plan) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_predict_graph_contains_no_body_op(family):
    c = case(family)
    predict = build_predict_graph(c.gm, c.plan)
    nodes = list(predict.graph.nodes)
    assert [n.name for n in nodes if n.op == "placeholder"][-1] == RESIDUAL_INPUT
    block_ops = [n.name for n in nodes if any(_BLOCK.match(p) for p in stack_paths(n))]
    assert block_ops == []
    # the body is gone (plus the head ops only the body needed); at most the 4 ops of h_in + residual were added
    assert len(nodes) <= len(c.gm.graph.nodes) - len(c.plan.body_nodes) + 5
    # and no parameter that only the body used is read any more (DiT's tail legitimately reads block 0's emb)
    body_only = {n.target for n in c.gm.graph.nodes
                 if n.op == "get_attr" and n.users and all(u.name in c.plan.body_nodes for u in n.users)}
    assert body_only
    assert not body_only & {n.target for n in nodes if n.op == "get_attr"}


# -- verify -------------------------------------------------------------------------------------------------------
def _timestep_embedding_node(c: Case) -> torch.fx.Node:
    """A float input of the body that is not the residual stream (the timestep or its embedding)."""
    h_in = node(c.gm, c.plan.body_input)
    shape = tuple(h_in.meta["val"].shape)
    body = {n for n in c.gm.graph.nodes if n.name in c.plan.body_nodes}
    for n in c.gm.graph.nodes:
        if n in body or n is h_in or not isinstance(n.meta.get("val"), torch.Tensor):
            continue
        if any(n in b.all_input_nodes for b in body) and tuple(n.meta["val"].shape) != shape:
            if n.meta["val"].is_floating_point() and n.op != "get_attr":
                return n
    raise AssertionError("no other body input found")


@pytest.mark.parametrize("family", ["dit", "flux"])
def test_verify_rejects_a_plan_with_the_wrong_body_input(family):
    c = case(family)
    wrong = dataclasses.replace(c.plan, body_input=_timestep_embedding_node(c).name)
    compute, predict = build_compute_graph(c.gm, wrong), build_predict_graph(c.gm, wrong)
    with pytest.raises(VerificationError, match="residual stack"):
        verify_rewrite(c.gm, compute, predict, c.leaves, wrong)


def test_verify_rejects_graphs_that_fail_or_differ():
    c = case("dit")
    plan = c.plan
    compute, predict = build_compute_graph(c.gm, plan), build_predict_graph(c.gm, plan)

    def broken_predict(*leaves):
        raise RuntimeError("shape mismatch")

    with pytest.raises(VerificationError, match="predict graph fails"):
        verify_rewrite(c.gm, compute, broken_predict, c.leaves, plan)

    def off_by_a_bit(*leaves):
        return tuple(o + 1e-3 for o in tensors(predict(*leaves)))

    with pytest.raises(VerificationError, match="differs from the original"):
        verify_rewrite(c.gm, compute, off_by_a_bit, c.leaves, plan)

    def compute_off(*leaves):
        *outs, r = compute(*leaves)
        return (*[o * (1 + 1e-6) for o in outs], r)

    with pytest.raises(VerificationError, match="bit for bit"):
        verify_rewrite(c.gm, compute_off, predict, c.leaves, plan)
    with pytest.raises(VerificationError, match="split"):
        verify_split(c.gm, lambda *leaves: tuple(o + 1e-7 for o in tensors(c.gm(*leaves))), c.leaves)


def test_runtime_refuses_a_wrong_plan_before_installing_anything(monkeypatch):
    import tcpade_fx.passes.dynamic as dynamic
    import tcpade_fx.passes.pipeline as pipeline

    module, kwargs = TINY_TRANSFORMERS["dit"]()
    with torch.no_grad():
        ref = module(**kwargs)[0]

    def wrong_locate(gm, prefixes=None):
        c = Case(module, kwargs, gm, [], locate_block_stack(gm, prefixes))
        return dataclasses.replace(c.plan, body_input=_timestep_embedding_node(c).name)

    monkeypatch.setattr(pipeline, "locate_block_stack", wrong_locate)
    monkeypatch.setattr(dynamic, "locate_block_stack", wrong_locate)  # the dynamic-shape capture locates too
    tcpade_fx.compile(module, "balanced")
    with pytest.raises(VerificationError):
        module(**kwargs)
    assert module.tcpade.graphs is None
    tcpade_fx.disable(module)
    with torch.no_grad():
        assert torch.equal(module(**kwargs)[0], ref)


# -- unsupported models -------------------------------------------------------------------------------------------
class SequentialMLP(nn.Module):
    """A plain MLP (an nn.Sequential of Linear/SiLU) with a timestep: no transformer-block stack."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 16), nn.SiLU(), nn.Linear(16, dim))

    def forward(self, hidden_states, timestep):
        return self.net(hidden_states + timestep[:, None])


def mlp_inputs() -> dict:
    return dict(hidden_states=torch.randn(2, 8, generator=torch.Generator().manual_seed(0)),
                timestep=torch.tensor([1.0, 1.0]))


def test_locate_refuses_a_plain_mlp_naming_what_it_looked_for():
    gm = capture_graph(SequentialMLP().eval(), (), mlp_inputs()).graph_module
    with pytest.raises(UnsupportedModelError) as info:
        locate_block_stack(gm)
    msg = str(info.value)
    for expected in ("transformer_blocks", "single_transformer_blocks", "blocks", "block_prefixes"):
        assert expected in msg


def test_explicit_block_prefixes_accept_a_stack_whose_output_is_the_model_output():
    """With block_prefixes the MLP is a (one-piece) stack; its body output is returned as is (no tail ops)."""
    module = SequentialMLP().eval()
    with torch.no_grad():
        ref = module(**mlp_inputs())
    tcpade_fx.compile(module, "full", block_prefixes=("net",))
    assert torch.equal(module(**mlp_inputs()), ref)
    plan = module.tcpade.graphs.plan
    assert plan.prefixes == ("net",) and plan.num_blocks == 3


class RawInputStack(nn.Module):
    """Blocks that read the raw input (no patch embedder) and whose stack output is returned as is."""

    class Block(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.norm, self.ff = nn.LayerNorm(dim), nn.Linear(dim, dim)

        def forward(self, h, t):
            return h + self.ff(self.norm(h)) * t[:, None, None]

    def __init__(self, dim: int = 8):
        super().__init__()
        self.layers = nn.ModuleList([self.Block(dim), self.Block(dim)])

    def forward(self, hidden_states, timestep):
        for block in self.layers:
            hidden_states = block(hidden_states, timestep)
        return hidden_states


def test_generic_stack_whose_input_is_a_graph_input_and_output_the_graph_output():
    module = RawInputStack().eval()
    kwargs = dict(hidden_states=torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(1)),
                  timestep=torch.tensor([0.5, 0.5]))
    gm = capture_graph(module, (), kwargs).graph_module
    plan = locate_block_stack(gm)  # found by the generic ModuleList rule
    assert plan.prefixes == ("layers",) and plan.body_input == "hidden_states"
    compute, predict = build_compute_graph(gm, plan), build_predict_graph(gm, plan)
    leaves = list(kwargs.values())
    assert verify_rewrite(gm, compute, predict, leaves, plan) < 1e-5
    with torch.no_grad():
        ref = module(**kwargs)
    tcpade_fx.compile(module, "full")
    assert torch.equal(module(**kwargs), ref)


def test_without_the_patch_embedder_rule_flux_equal_token_counts_are_ambiguous(monkeypatch):
    """What PATCH_EMBEDDERS is for: with text tokens = image tokens two body inputs have the output's shape; only
    the embedder names tell them apart (the test above shows the choice is right)."""
    import tcpade_fx.passes.locate as locate

    module, kwargs = tiny_flux(image_tokens=16, text_tokens=16)
    gm = capture_graph(module, (), kwargs).graph_module
    monkeypatch.setattr(locate, "PATCH_EMBEDDERS", ())
    with pytest.raises(UnsupportedModelError, match="cannot tell the block stack's residual input"):
        locate_block_stack(gm)
