"""Tiny, offline, random-weight diffusers transformers with matching example inputs.

For mechanics only (capture, split, rewrite, runtime): random weights say nothing about image quality.
"""

from __future__ import annotations

from typing import Callable

import torch

TinyCase = tuple[torch.nn.Module, dict]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_flux_transformer() -> torch.nn.Module:
    """The tiny FluxTransformer2DModel (2 dual + 2 single blocks, 8 channels) of the tests and tiny pipelines."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=8, out_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def tiny_wan_transformer() -> torch.nn.Module:
    """The tiny WanTransformer3DModel (2 blocks, 4 latent channels)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()


def tiny_sd3_transformer() -> torch.nn.Module:
    """The tiny SD3Transformer2DModel (2 joint blocks, 8×8 latents)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16,
    ).eval()


def tiny_pixart_transformer() -> torch.nn.Module:
    """The tiny PixArtTransformer2DModel (2 blocks, 8×8 latents, 24-d captions)."""
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=24, norm_num_groups=1,
        use_additional_conditions=False,
    ).eval()


def tiny_dit(batch: int = 2, seed: int = 0) -> TinyCase:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    m = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, sample_size=8, patch_size=2,
        num_embeds_ada_norm=10, norm_num_groups=1,
    ).eval()
    g = _gen(seed)
    kw = dict(
        hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
        timestep=torch.full((batch,), 500.0),
        class_labels=torch.arange(batch) % 10,
        return_dict=False,
    )
    return m, kw


def tiny_flux(batch: int = 2, seed: int = 0, image_tokens: int = 16, text_tokens: int = 8) -> TinyCase:
    torch.manual_seed(seed)
    m = tiny_flux_transformer()
    g = _gen(seed)
    side = int(image_tokens**0.5)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    kw = dict(
        hidden_states=torch.randn(batch, image_tokens, 8, generator=g),
        encoder_hidden_states=torch.randn(batch, text_tokens, 32, generator=g),
        pooled_projections=torch.randn(batch, 16, generator=g),
        timestep=torch.full((batch,), 0.5),
        img_ids=img_ids,
        txt_ids=torch.zeros(text_tokens, 3),
        return_dict=False,
    )
    return m, kw


def tiny_wan(batch: int = 1, seed: int = 0) -> TinyCase:
    torch.manual_seed(seed)
    m = tiny_wan_transformer()
    g = _gen(seed)
    kw = dict(
        hidden_states=torch.randn(batch, 4, 2, 8, 8, generator=g),
        timestep=torch.full((batch,), 500.0),
        encoder_hidden_states=torch.randn(batch, 8, 16, generator=g),
        return_dict=False,
    )
    return m, kw


def tiny_sd3(batch: int = 2, seed: int = 0) -> TinyCase:
    torch.manual_seed(seed)
    m = tiny_sd3_transformer()
    g = _gen(seed)
    kw = dict(
        hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(batch, 6, 16, generator=g),
        pooled_projections=torch.randn(batch, 16, generator=g),
        timestep=torch.full((batch,), 500.0),
        return_dict=False,
    )
    return m, kw


def tiny_pixart(batch: int = 2, seed: int = 0) -> TinyCase:
    torch.manual_seed(seed)
    m = tiny_pixart_transformer()
    g = _gen(seed)
    kw = dict(
        hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(batch, 6, 24, generator=g),
        timestep=torch.full((batch,), 500.0),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )
    return m, kw


TINY_TRANSFORMERS: dict[str, Callable[..., TinyCase]] = {
    "dit": tiny_dit,
    "flux": tiny_flux,
    "wan": tiny_wan,
    "sd3": tiny_sd3,
    "pixart": tiny_pixart,
}


class AttentionCounter:
    """Counts attention ops (``aten.*scaled_dot_product*``) run on real tensors while active; those on the fake
    tensors of a torch.export trace are not counted. A measure of model work that timing noise does not blur::

        with AttentionCounter() as count:
            module(**kwargs)
        count.calls
    """

    def __init__(self):
        self.calls = 0
        self._mode = None

    def __enter__(self) -> "AttentionCounter":
        from torch._subclasses.fake_tensor import FakeTensor
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if "scaled_dot_product" in func.__name__:
                    flat = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
                    if flat and not any(isinstance(a, FakeTensor) for a in flat):
                        counter.calls += 1
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        self._mode.__exit__(*exc)
        return False


def drive_controller(policy, steps: int, error: float):
    """A :class:`~tcpade_fx.controller.StepController` run over ``steps`` evenly spaced times, every checked error
    ``error`` (the first computed step has none): what its decisions are with no model behind it."""
    from .controller import StepController

    ctl = StepController(policy, steps)
    for i in range(steps):
        t = 1.0 - i / steps
        if ctl.decide(i, t).compute:
            ctl.record_compute(i, t, error if ctl.computed else None, None)
        else:
            ctl.record_predict()
    return ctl
