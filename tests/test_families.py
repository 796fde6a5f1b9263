"""Diffusers transformer families beyond the five (tcpade_fx.testing_families), tiny random-weight configs.

Each family: "full" over a short hand-written loop of decreasing timesteps gives the uncompiled module's outputs
bit for bit (the first step, and every step after it) with the block stack expected located, and "balanced" over
12 steps ends finite with caching engaged (both marked slow: a capture each). Refused families are refused with what to do. Then the generic
fallback's three cases on toy models: blocks linked by long skips under names no family uses, a forward whose
Python logic torch.export refuses (captured by tracing real tensors, its tensor reads guarded), and what that route
refuses.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tcpade_fx
from tcpade_fx import Policy
from tcpade_fx.passes import CaptureError, build_graphs, capture_graph, locate_block_stack, time_argument
from tcpade_fx.passes.capture import ValueChangedError
from tcpade_fx.testing_families import FAMILY_TRANSFORMERS, REFUSED, TIME_SCALE, tiny_lumina2

SUPPORTED = sorted(set(FAMILY_TRANSFORMERS) - set(REFUSED))

#: The block stack each family's body covers: its ModuleLists and number of blocks.
EXPECTED_PLAN = {
    "allegro": (("transformer_blocks",), 2),
    "auraflow": (("joint_transformer_blocks", "single_transformer_blocks"), 4),  # joint sequence sliced after
    "chroma": (("single_transformer_blocks", "transformer_blocks"), 2),  # likewise
    "cogvideox": (("transformer_blocks",), 2),
    "cogview3plus": (("transformer_blocks",), 2),
    "cogview4": (("transformer_blocks",), 2),
    "easyanimate": (("transformer_blocks",), 2),
    "hunyuan_dit": (("blocks",), 4),  # U-shaped long skips inside the body
    "hunyuan_video": (("single_transformer_blocks", "transformer_blocks"), 2),
    "latte": (("temporal_transformer_blocks", "transformer_blocks"), 4),  # two interleaved ModuleLists
    "ltx": (("transformer_blocks",), 2),
    "lumina2": (("layers",), 2),  # context/noise refiners before the main stack stay in the head
    "lumina_next": (("layers",), 2),
    "mochi": (("transformer_blocks",), 2),
    "omnigen": (("layers",), 2),
    "qwenimage": (("transformer_blocks",), 2),
    "sana": (("transformer_blocks",), 2),
    "skyreels_v2": (("blocks",), 2),
}
#: Families torch.export refuses, captured by tracing real tensors (Lumina2 too: its test below reads the guard).
TRACED = {"cogvideox", "omnigen"}


def sample(module, kwargs: dict, steps: int, scale: float) -> list[torch.Tensor]:
    """A hand-written Euler loop over decreasing timesteps; the model outputs, one per step."""
    x, outs = kwargs["hidden_states"], []
    time_name = time_argument(kwargs)  # HiDream's is `timesteps`
    for k in range(steps):
        t = torch.full_like(kwargs[time_name], scale * (1 - k / steps))
        with torch.no_grad():
            out = module(**dict(kwargs, hidden_states=x, **{time_name: t}))[0]
        outs.append(out)
        x = x - out / steps
    return outs


def test_every_family_has_a_plan_and_more_than_eight_are_supported():
    assert set(EXPECTED_PLAN) == set(SUPPORTED)
    assert len(SUPPORTED) >= 8


@pytest.mark.parametrize("family", SUPPORTED)
def test_family_full_is_exact_and_balanced_caches(family):
    module, kwargs = FAMILY_TRANSFORMERS[family]()
    scale = TIME_SCALE[family]
    reference = sample(module, kwargs, 3, scale)
    # static shapes: one torch.export per family (the dynamic-shape capture, several exports, is covered by
    # tests/test_shapes.py and the pipeline tests); the same graphs then serve both policies
    tcpade_fx.compile(module, "full", dynamic_shapes=False)
    got = sample(module, kwargs, 3, scale)
    assert torch.equal(got[0], reference[0])
    assert all(torch.equal(g, r) for g, r in zip(got, reference))
    assert module.tcpade.stats.predicted == 0
    plan = module.tcpade.graphs.plan
    assert (plan.prefixes, plan.num_blocks) == EXPECTED_PLAN[family]

    module.tcpade.policy = Policy.preset("balanced")
    module.tcpade.begin(12)
    outs = sample(module, kwargs, 12, scale)
    stats = module.tcpade.stats
    assert torch.isfinite(outs[-1]).all()
    assert stats.predicted > 0, stats.summary()
    assert stats.computed + stats.predicted == 12 and stats.captures == 0
    tcpade_fx.disable(module)


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_family_refused_with_what_to_do(family):
    module, kwargs = FAMILY_TRANSFORMERS[family]()
    error, phrase = REFUSED[family]
    tcpade_fx.compile(module, "balanced")
    with pytest.raises(error, match=phrase):
        with torch.no_grad():
            module(**kwargs)
    tcpade_fx.disable(module)


# -- long skips under generic names -------------------------------------------------------------------------------
class SkipBlock(nn.Module):
    def __init__(self, dim: int, skip: bool = False):
        super().__init__()
        self.skip = nn.Linear(2 * dim, dim) if skip else None
        self.norm, self.ff, self.mod = nn.LayerNorm(dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, h, temb, skip=None):
        if self.skip is not None:
            h = self.skip(torch.cat([h, skip], dim=-1))
        return h + self.ff(self.norm(h)) * self.mod(temb)


class UShapedStack(nn.Module):
    """U-ViT-style: ``in_blocks``, a single ``mid_block``, ``out_blocks``, each out block reading the output of
    the in block mirroring it (names no known family uses: found by the generic ModuleList rule)."""

    def __init__(self, dim: int = 8, depth: int = 2):
        super().__init__()
        self.proj_in, self.time = nn.Linear(4, dim), nn.Linear(1, dim)
        self.in_blocks = nn.ModuleList([SkipBlock(dim) for _ in range(depth)])
        self.mid_block = SkipBlock(dim)
        self.out_blocks = nn.ModuleList([SkipBlock(dim, skip=True) for _ in range(depth)])
        self.proj_out = nn.Linear(dim, 4)

    def forward(self, hidden_states, timestep):
        h = self.proj_in(hidden_states)
        temb = self.time(timestep[:, None, None] / 1000)
        skips = []
        for block in self.in_blocks:
            h = block(h, temb)
            skips.append(h)
        h = self.mid_block(h, temb)
        for block in self.out_blocks:
            h = block(h, temb, skips.pop())
        return (self.proj_out(h),)


def assert_full_exact_and_balanced_caches(module, kwargs, scale: float = 1000.0) -> None:
    """"full" over 3 steps equals the uncompiled module; "balanced" over 12 predicts some steps, finite. Leaves the
    module compiled with "balanced"."""
    reference = sample(module, kwargs, 3, scale)
    tcpade_fx.compile(module, "full")
    assert all(torch.equal(g, r) for g, r in zip(sample(module, kwargs, 3, scale), reference))
    tcpade_fx.disable(module)
    tcpade_fx.compile(module, "balanced")
    module.tcpade.begin(12)
    assert torch.isfinite(sample(module, kwargs, 12, scale)[-1]).all()
    assert module.tcpade.stats.predicted > 0


def test_long_skips_between_generic_block_lists_stay_inside_the_body():
    torch.manual_seed(0)
    module = UShapedStack().eval()
    kwargs = dict(hidden_states=torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0)),
                  timestep=torch.full((2,), 1000.0))
    gm = capture_graph(module, (), kwargs).graph_module
    plan = locate_block_stack(gm)
    assert plan.prefixes == ("in_blocks", "out_blocks") and plan.num_blocks == 4
    mid = [n.name for n in gm.graph.nodes
           if any(p[0] == "mid_block" for p in (n.meta.get("nn_module_stack") or {}).values())]
    # the middle block between the lists is body too (but for its temb projection, which leaves the stream alone)
    assert mid[-1] in plan.body_nodes and [n for n in mid if n.startswith("layer_norm")][0] in plan.body_nodes
    assert_full_exact_and_balanced_caches(module, kwargs)
    tcpade_fx.disable(module)


# -- forwards torch.export refuses ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(TRACED))
def test_export_refused_families_are_traced_with_real_tensors(family):
    module, kwargs = FAMILY_TRANSFORMERS[family]()
    captured = capture_graph(module, (), kwargs)
    assert captured.route == "real-tensor trace"
    assert "torch.export refused" in captured.notes[0]


def test_the_fallback_route_is_recorded_in_the_stats():
    module, kwargs = FAMILY_TRANSFORMERS["omnigen"]()
    tcpade_fx.compile(module, "full", dynamic_shapes=False)
    with torch.no_grad():
        module(**kwargs)
    assert module.tcpade.graphs.capture_route == "real-tensor trace"
    assert any("torch.export refused" in n for n in module.tcpade.stats.notes), module.tcpade.stats.notes
    tcpade_fx.disable(module)


class TimestepsStack(UShapedStack):
    """Takes its model time as ``timesteps`` (HiDream's name)."""

    def forward(self, hidden_states, timesteps):
        return super().forward(hidden_states, timesteps)


def test_a_model_time_named_timesteps_is_followed():
    torch.manual_seed(0)
    module = TimestepsStack().eval()
    kwargs = dict(hidden_states=torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0)),
                  timesteps=torch.full((2,), 1000.0))
    assert_full_exact_and_balanced_caches(module, kwargs)
    with pytest.raises(TypeError, match="timestep or timesteps"):
        module(hidden_states=kwargs["hidden_states"], timesteps=1000.0)
    tcpade_fx.disable(module)


def test_without_the_fallback_an_export_refusal_names_the_module():
    module, kwargs = FAMILY_TRANSFORMERS["omnigen"]()  # refused fastest of the three
    with pytest.raises(CaptureError, match="could not capture OmniGenTransformer2DModel with torch.export"):
        capture_graph(module, (), kwargs, fallback=False)


def test_a_traced_graph_refuses_a_call_whose_python_read_value_differs():
    """Lumina2 reads its caption mask with .tolist() and pads by the lengths: a graph traced with a full mask
    must not serve a shorter caption of the same padded shape."""
    module, kwargs = tiny_lumina2()
    graphs = build_graphs(module, kwargs)
    mask = list(kwargs).index("encoder_attention_mask")
    assert graphs.leaf_names[mask] == "encoder_attention_mask"
    later = list(graphs.leaves)
    later[list(kwargs).index("timestep")] = kwargs["timestep"] * 0.5
    with torch.no_grad():
        *outs, residual = graphs.compute(*later)  # the same mask: the graph serves it
        graphs.predict(*later, residual)
        short = kwargs["encoder_attention_mask"].clone()
        short[:, -2:] = False
        later[mask] = short
        for graph, extra in ((graphs.compute, ()), (graphs.predict, (residual,))):
            with pytest.raises(ValueChangedError, match=r"transformer_lumina2.py.*tolist\(\).*\[6, 6\].*\[4, 4\]"):
                graph(*later, *extra)


class ReadsTheTimestep(nn.Module):
    """A branch on the timestep's value in Python: torch.export refuses it, and one graph cannot serve a run."""

    def __init__(self):
        super().__init__()
        self.proj_in = nn.Linear(4, 4)
        self.blocks = nn.ModuleList([SkipBlock(4), SkipBlock(4)])

    def forward(self, hidden_states, timestep):
        scale = 2.0 if float(timestep.max()) > 500 else 1.0
        h = self.proj_in(hidden_states) * scale
        for block in self.blocks:
            h = block(h, h.mean(1, keepdim=True))
        return (h,)


def test_a_forward_reading_the_timestep_value_is_refused_naming_the_module_and_the_line():
    module = ReadsTheTimestep().eval()
    kwargs = dict(hidden_states=torch.randn(1, 3, 4), timestep=torch.tensor([900.0]))
    with pytest.raises(CaptureError) as info:
        build_graphs(module, kwargs)
    message = str(info.value)
    assert "ReadsTheTimestep" in message and "`timestep`" in message
    assert "float(timestep.max())" in message  # the line that reads it
    assert "without tcpade_fx" in message


class NoisyPaddedStack(nn.Module):
    """Python-side logic on mask lengths (torch.export refuses it) and noise drawn in the forward (a traced graph
    cannot reproduce it): neither route captures it."""

    def __init__(self):
        super().__init__()
        self.proj_in = nn.Linear(4, 4)
        self.blocks = nn.ModuleList([SkipBlock(4), SkipBlock(4)])

    def forward(self, hidden_states, timestep, mask):
        lengths = set(mask.sum(1).tolist())
        h = self.proj_in(hidden_states) + torch.randn_like(hidden_states) * len(lengths)
        for block in self.blocks:
            h = block(h, timestep[:, None, None].expand_as(h))
        return (h,)


def test_both_routes_refused_names_the_module_both_causes_and_what_to_do():
    module = NoisyPaddedStack().eval()
    kwargs = dict(hidden_states=torch.randn(1, 3, 4), timestep=torch.tensor([0.5]), mask=torch.ones(1, 3))
    with pytest.raises(CaptureError) as info:
        capture_graph(module, (), kwargs)
    message = str(info.value)
    assert "could not capture NoisyPaddedStack" in message
    assert "torch.export (non-strict) refused it (" in message
    assert "does not reproduce its forward bit for bit" in message and "without tcpade_fx" in message
