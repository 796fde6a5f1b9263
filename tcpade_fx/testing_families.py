"""Tiny, offline, random-weight transformers of diffusers families beyond the five of :mod:`tcpade_fx.testing`.

Each builder returns ``(module, kwargs)`` like :data:`tcpade_fx.testing.TINY_TRANSFORMERS`: a freshly initialised
transformer (eval mode, seeded) and the keyword arguments of one call (``return_dict=False``; the output's first
element has ``hidden_states``' shape). Configs follow diffusers' own model tests (``tests/models/transformers``),
shrunk where that keeps the model valid, and keep what makes a family hard for the generic fallback: HunyuanDiT's
U-shaped long skips, Lumina2's refiner ModuleLists before the main stack, AuraFlow's and Chroma's joint sequence
sliced after the last block, Latte's two interleaved ModuleLists, forwards torch.export refuses (CogVideoX,
Lumina2, OmniGen: captured by tracing real tensors). For mechanics only: random weights say nothing about quality.

:data:`FAMILY_TRANSFORMERS` maps a short family name to its builder; :data:`TIME_SCALE` gives the timestep at the
start of a trajectory in the family's own units (most take 0..1000, some 0..1); :data:`REFUSED` names the families
tcpade_fx refuses, and with which error.
"""

from __future__ import annotations

from typing import Callable

import torch

from .passes import CaptureError
from .testing import TinyCase


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def tiny_hunyuan_dit(batch: int = 2, seed: int = 0) -> TinyCase:
    """HunyuanDiT2DModel: 4 blocks with U-shaped long skips (block 3 also reads block 0's output)."""
    from diffusers import HunyuanDiT2DModel

    torch.manual_seed(seed)
    m = HunyuanDiT2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=2,
        cross_attention_dim=8, cross_attention_dim_t5=8, pooled_projection_dim=4, hidden_size=16, text_len=4,
        text_len_t5=4, activation_fn="gelu-approximate", learn_sigma=False,
    ).eval()
    g = _gen(seed)
    angles = _randn(16, 8, g=g)  # rotary angles: 16 image tokens, head dim 8
    kw = dict(
        hidden_states=_randn(batch, 4, 8, 8, g=g),
        timestep=torch.full((batch,), 500.0),
        encoder_hidden_states=_randn(batch, 4, 8, g=g),
        text_embedding_mask=torch.ones(batch, 4),
        encoder_hidden_states_t5=_randn(batch, 4, 8, g=g),
        text_embedding_mask_t5=torch.ones(batch, 4),
        image_meta_size=torch.tensor([[1024.0, 1024.0, 16.0, 16.0, 0.0, 0.0]] * batch),
        style=torch.zeros(batch, dtype=torch.long),
        image_rotary_emb=(angles.cos(), angles.sin()),
        return_dict=False,
    )
    return m, kw


def tiny_lumina2(batch: int = 2, seed: int = 0) -> TinyCase:
    """Lumina2Transformer2DModel: noise and context refiner blocks before the main stack."""
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(seed)
    m = Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=24, num_layers=2, num_refiner_layers=2,
        num_attention_heads=3, num_kv_heads=1, multiple_of=2, ffn_dim_multiplier=None, norm_eps=1e-5,
        scaling_factor=1.0, axes_dim_rope=(4, 2, 2), axes_lens=(32, 32, 32), cap_feat_dim=16,
    ).eval()
    g = _gen(seed)
    kw = dict(
        hidden_states=_randn(batch, 4, 8, 8, g=g),
        timestep=torch.full((batch,), 0.5),
        encoder_hidden_states=_randn(batch, 6, 16, g=g),
        encoder_attention_mask=torch.ones(batch, 6, dtype=torch.bool),
        return_dict=False,
    )
    return m, kw


def tiny_lumina_next(batch: int = 2, seed: int = 0) -> TinyCase:
    """LuminaNextDiT2DModel."""
    from diffusers import LuminaNextDiT2DModel
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    torch.manual_seed(seed)
    m = LuminaNextDiT2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=24, num_layers=2, num_attention_heads=3,
        num_kv_heads=1, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5, learn_sigma=False, qk_norm=True,
        cross_attention_dim=16, scaling_factor=1.0,
    ).eval()
    g = _gen(seed)
    kw = dict(
        hidden_states=_randn(batch, 4, 8, 8, g=g),
        timestep=torch.full((batch,), 0.5),
        encoder_hidden_states=_randn(batch, 6, 16, g=g),
        encoder_mask=torch.ones(batch, 6),
        image_rotary_emb=get_2d_rotary_pos_embed_lumina(8, 32, 32),
        cross_attention_kwargs={},
        return_dict=False,
    )
    return m, kw


def tiny_cogvideox(batch: int = 2, seed: int = 0) -> TinyCase:
    """CogVideoXTransformer3DModel (text and video tokens concatenated in the blocks)."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    m = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=8, num_layers=2, sample_width=8, sample_height=8, sample_frames=8, patch_size=2,
        patch_size_t=None, temporal_compression_ratio=4, max_text_seq_length=8,
    ).eval()
    g = _gen(seed)
    kw = dict(
        hidden_states=_randn(batch, 1, 4, 8, 8, g=g),
        encoder_hidden_states=_randn(batch, 8, 8, g=g),
        timestep=torch.full((batch,), 500.0),
        return_dict=False,
    )
    return m, kw


def tiny_allegro(batch: int = 2, seed: int = 0) -> TinyCase:
    """AllegroTransformer3DModel."""
    from diffusers import AllegroTransformer3DModel

    torch.manual_seed(seed)
    m = AllegroTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2,
        cross_attention_dim=16, sample_width=8, sample_height=8, sample_frames=8, caption_channels=8,
    ).eval()
    g = _gen(seed)
    kw = dict(
        hidden_states=_randn(batch, 4, 2, 8, 8, g=g),
        encoder_hidden_states=_randn(batch, 8, 8, g=g),
        timestep=torch.full((batch,), 500.0),
        return_dict=False,
    )
    return m, kw


def tiny_ltx(batch: int = 2, seed: int = 0) -> TinyCase:
    """LTXVideoTransformer3DModel (token inputs; frames/height/width as ints)."""
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    m = LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=2, qk_norm="rms_norm_across_heads", caption_channels=16,
    ).eval()
    g = _gen(seed)
    kw = dict(
        hidden_states=_randn(batch, 2 * 4 * 4, 4, g=g),
        encoder_hidden_states=_randn(batch, 6, 16, g=g),
        timestep=torch.full((batch,), 500.0),
        encoder_attention_mask=torch.ones(batch, 6, dtype=torch.bool),
        num_frames=2, height=4, width=4,
        return_dict=False,
    )
    return m, kw


def tiny_mochi(batch: int = 2, seed: int = 0) -> TinyCase:
    """MochiTransformer3DModel."""
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(seed)
    m = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=4, out_channels=None, qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4,
        activation_fn="swiglu", max_sequence_length=16,
    ).eval()
    g = _gen(seed)
    kw = dict(
        hidden_states=_randn(batch, 4, 2, 8, 8, g=g),
        encoder_hidden_states=_randn(batch, 6, 16, g=g),
        timestep=torch.full((batch,), 500.0),
        encoder_attention_mask=torch.ones(batch, 6, dtype=torch.bool),
        return_dict=False,
    )
    return m, kw


def tiny_sana(batch: int = 2, seed: int = 0) -> TinyCase:
    """SanaTransformer2DModel (linear attention)."""
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(seed)
    m = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=2,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=8,
    ).eval()
    g = _gen(seed)
    kw = dict(
        hidden_states=_randn(batch, 4, 8, 8, g=g),
        encoder_hidden_states=_randn(batch, 6, 8, g=g),
        timestep=torch.full((batch,), 500.0),
        return_dict=False,
    )
    return m, kw


def tiny_auraflow(batch: int = 2, seed: int = 0) -> TinyCase:
    """AuraFlowTransformer2DModel (joint MMDiT blocks, then single DiT blocks)."""
    from diffusers import AuraFlowTransformer2DModel

    torch.manual_seed(seed)
    m = AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=2, num_single_dit_layers=2,
        attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
        out_channels=4, pos_embed_max_size=64,
    ).eval()
    g = _gen(seed)
    kw = dict(
        hidden_states=_randn(batch, 4, 8, 8, g=g),
        encoder_hidden_states=_randn(batch, 6, 16, g=g),
        timestep=torch.full((batch,), 500.0),
        return_dict=False,
    )
    return m, kw


def tiny_hunyuan_video(batch: int = 1, seed: int = 0) -> TinyCase:
    """HunyuanVideoTransformer3DModel (a token refiner before dual and single stream blocks)."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    m = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=2, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), image_condition_type=None,
    ).eval()
    g = _gen(seed)
    kw = dict(
        hidden_states=_randn(batch, 4, 1, 4, 4, g=g),
        timestep=torch.full((batch,), 500.0),
        encoder_hidden_states=_randn(batch, 6, 16, g=g),
        encoder_attention_mask=torch.ones(batch, 6),
        pooled_projections=_randn(batch, 8, g=g),
        guidance=torch.full((batch,), 3500.0),
        return_dict=False,
    )
    return m, kw


def _cogview_kwargs(batch: int, g: torch.Generator) -> dict:
    return dict(
        hidden_states=_randn(batch, 4, 8, 8, g=g),
        encoder_hidden_states=_randn(batch, 6, 8, g=g),
        timestep=torch.full((batch,), 500.0),
        original_size=torch.tensor([[64.0, 64.0]] * batch),
        target_size=torch.tensor([[64.0, 64.0]] * batch),
        crop_coords=torch.tensor([[0.0, 0.0]] * batch),
        return_dict=False,
    )


def tiny_cogview3plus(batch: int = 2, seed: int = 0) -> TinyCase:
    """CogView3PlusTransformer2DModel."""
    from diffusers import CogView3PlusTransformer2DModel

    torch.manual_seed(seed)
    m = CogView3PlusTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=2, out_channels=4,
        text_embed_dim=8, time_embed_dim=8, condition_dim=2, pos_embed_max_size=8, sample_size=8,
    ).eval()
    return m, _cogview_kwargs(batch, _gen(seed))


def tiny_cogview4(batch: int = 2, seed: int = 0) -> TinyCase:
    """CogView4Transformer2DModel."""
    from diffusers import CogView4Transformer2DModel

    torch.manual_seed(seed)
    m = CogView4Transformer2DModel(
        patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=4, out_channels=4,
        text_embed_dim=8, time_embed_dim=8, condition_dim=4,
    ).eval()
    return m, _cogview_kwargs(batch, _gen(seed))


def tiny_chroma(batch: int = 1, seed: int = 0) -> TinyCase:
    """ChromaTransformer2DModel (Flux-like, modulation from a distilled approximator)."""
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(seed)
    m = ChromaTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8), approximator_num_channels=8,
        approximator_hidden_dim=16, approximator_layers=1,
    ).eval()
    g = _gen(seed)
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    kw = dict(
        hidden_states=_randn(batch, 16, 4, g=g),
        encoder_hidden_states=_randn(batch, 6, 32, g=g),
        timestep=torch.full((batch,), 0.5),
        img_ids=torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float(),
        txt_ids=torch.zeros(6, 3),
        return_dict=False,
    )
    return m, kw


def tiny_qwenimage(batch: int = 1, seed: int = 0) -> TinyCase:
    """QwenImageTransformer2DModel (``img_shapes`` as a Python list)."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    m = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    ).eval()
    g = _gen(seed)
    kw = dict(
        hidden_states=_randn(batch, 16, 16, g=g),
        encoder_hidden_states=_randn(batch, 6, 16, g=g),
        encoder_hidden_states_mask=torch.ones(batch, 6, dtype=torch.long),
        timestep=torch.full((batch,), 0.5),
        img_shapes=[(1, 4, 4)] * batch,
        return_dict=False,
    )
    return m, kw


def tiny_skyreels_v2(batch: int = 1, seed: int = 0) -> TinyCase:
    """SkyReelsV2Transformer3DModel (Wan-like)."""
    from diffusers import SkyReelsV2Transformer3DModel

    torch.manual_seed(seed)
    m = SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()
    g = _gen(seed)
    kw = dict(
        hidden_states=_randn(batch, 4, 2, 8, 8, g=g),
        timestep=torch.full((batch,), 500.0),
        encoder_hidden_states=_randn(batch, 6, 16, g=g),
        return_dict=False,
    )
    return m, kw


def tiny_latte(batch: int = 2, seed: int = 0) -> TinyCase:
    """LatteTransformer3DModel (spatial and temporal block lists, interleaved)."""
    from diffusers import LatteTransformer3DModel

    torch.manual_seed(seed)
    m = LatteTransformer3DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=4, num_attention_heads=2, caption_channels=8,
        in_channels=4, cross_attention_dim=8, out_channels=4, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        video_length=2,
    ).eval()
    g = _gen(seed)
    kw = dict(
        hidden_states=_randn(batch, 4, 2, 8, 8, g=g),
        timestep=torch.full((batch,), 500.0),
        encoder_hidden_states=_randn(batch, 6, 8, g=g),
        enable_temporal_attentions=True,
        return_dict=False,
    )
    return m, kw


def tiny_easyanimate(batch: int = 2, seed: int = 0) -> TinyCase:
    """EasyAnimateTransformer3DModel."""
    from diffusers import EasyAnimateTransformer3DModel

    torch.manual_seed(seed)
    m = EasyAnimateTransformer3DModel(
        attention_head_dim=16, num_attention_heads=2, in_channels=4, mmdit_layers=2, num_layers=2, out_channels=4,
        patch_size=2, sample_height=60, sample_width=90, text_embed_dim=16, time_embed_dim=8,
        time_position_encoding_type="3d_rope", timestep_activation_fn="silu",
    ).eval()
    g = _gen(seed)
    kw = dict(
        hidden_states=_randn(batch, 4, 2, 8, 8, g=g),
        timestep=torch.full((batch,), 500.0),
        encoder_hidden_states=_randn(batch, 6, 16, g=g),
        return_dict=False,
    )
    return m, kw


def tiny_omnigen(batch: int = 2, seed: int = 0) -> TinyCase:
    """OmniGenTransformer2DModel (a Phi-3-style LLM stack over text and image tokens)."""
    from diffusers import OmniGenTransformer2DModel

    torch.manual_seed(seed)
    m = OmniGenTransformer2DModel(
        hidden_size=16, num_attention_heads=4, num_key_value_heads=4, intermediate_size=32, num_layers=2,
        pad_token_id=0, vocab_size=100, in_channels=4, time_step_dim=4,
        rope_scaling={"long_factor": list(range(1, 3)), "short_factor": list(range(1, 3))},
    ).eval()
    g = _gen(seed)
    seq = 6 + 1 + 16
    kw = dict(
        hidden_states=_randn(batch, 4, 8, 8, g=g),
        timestep=torch.full((batch,), 0.5),
        input_ids=torch.randint(0, 10, (batch, 6), generator=g),
        input_img_latents=[],
        input_image_sizes={},
        attention_mask=torch.ones(batch, seq, seq),
        position_ids=torch.arange(seq).repeat(batch, 1),
        return_dict=False,
    )
    return m, kw


def tiny_hidream(batch: int = 2, seed: int = 0) -> TinyCase:
    """HiDreamImageTransformer2DModel (its time argument is ``timesteps``)."""
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(seed)
    m = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=2,
        num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32), llama_layers=(0, 1),
        force_inference_output=True,
    ).eval()
    g = _gen(seed)
    kw = dict(
        hidden_states=_randn(batch, 4, 8, 8, g=g),
        timesteps=torch.full((batch,), 500.0),
        encoder_hidden_states_t5=_randn(batch, 6, 8, g=g),
        encoder_hidden_states_llama3=_randn(2, batch, 6, 4, g=g),
        pooled_embeds=_randn(batch, 8, g=g),
        return_dict=False,
    )
    return m, kw


FAMILY_TRANSFORMERS: dict[str, Callable[..., TinyCase]] = {
    "hunyuan_dit": tiny_hunyuan_dit,
    "lumina2": tiny_lumina2,
    "lumina_next": tiny_lumina_next,
    "cogvideox": tiny_cogvideox,
    "allegro": tiny_allegro,
    "ltx": tiny_ltx,
    "mochi": tiny_mochi,
    "sana": tiny_sana,
    "auraflow": tiny_auraflow,
    "hunyuan_video": tiny_hunyuan_video,
    "cogview3plus": tiny_cogview3plus,
    "cogview4": tiny_cogview4,
    "chroma": tiny_chroma,
    "qwenimage": tiny_qwenimage,
    "skyreels_v2": tiny_skyreels_v2,
    "latte": tiny_latte,
    "easyanimate": tiny_easyanimate,
    "omnigen": tiny_omnigen,
    "hidream": tiny_hidream,
}

#: The timestep at the start of a trajectory, in each family's own units (what its pipeline passes): most take
#: 0..1000, these take 0..1.
TIME_SCALE: dict[str, float] = {name: 1000.0 for name in FAMILY_TRANSFORMERS}
TIME_SCALE.update(lumina2=1.0, lumina_next=1.0, chroma=1.0, qwenimage=1.0, auraflow=1.0)

#: Families tcpade_fx refuses, with the error type and a phrase of its message (tests check the refusal):
#: HiDream (its model time is ``timesteps``, which is followed) routes tokens to its MoE experts in Python at
#: inference (``moe_infer``: ``bincount().cpu().numpy()`` of the routing, a value that changes at every step), so
#: no captured graph serves a run: refused, naming the function.
REFUSED: dict[str, tuple[type, str]] = {"hidream": (CaptureError, "moe_infer")}
