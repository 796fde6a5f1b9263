"""Tiny, offline, random-weight diffusers *pipelines* (DiT, Flux, Wan, SD3, PixArt-Σ) and call arguments for them.

No tokenizer or text encoder is needed: every pipeline but DiT is called with precomputed prompt embeddings
(random tensors of the right shape), and its text encoders/tokenizers are ``None``. For mechanics only
(pipeline integration, CFG branches, compile counts): random weights say nothing about image quality.

Each ``tiny_*_pipeline(seed)`` returns ``(pipe, call_kwargs)``; ``pipe(**call_kwargs, num_inference_steps=n,
generator=torch.Generator().manual_seed(s))`` runs a full trajectory. The Flux, Wan and SD3/PixArt pipelines
import ``transformers`` (diffusers imports it at module level), so it must be installed.
"""

from __future__ import annotations

from typing import Callable

import torch

from .testing import tiny_flux_transformer, tiny_pixart_transformer, tiny_sd3_transformer, tiny_wan_transformer

TinyPipelineCase = tuple[object, dict]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tiny_vae(latent_channels: int, *, shift_factor: float | None = None, levels: int = 2):
    """An AutoencoderKL with ``2 ** (levels - 1)`` spatial downsampling."""
    from diffusers import AutoencoderKL

    kw = {} if shift_factor is None else {"shift_factor": shift_factor}
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=(8,) * levels, layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=16, scaling_factor=0.5, **kw,
    ).eval()


def tiny_dit_pipeline(seed: int = 0, guidance_scale: float = 4.0) -> TinyPipelineCase:
    """DiTPipeline: batched CFG (the pipeline doubles the batch and uses class 1000 as the null label)."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, sample_size=8, patch_size=2,
        num_embeds_ada_norm=1000, norm_num_groups=1, out_channels=8,
    ).eval()
    vae = _tiny_vae(4)
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label={0: "zero", 1: "one"})
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(class_labels=[0, 1], guidance_scale=guidance_scale, output_type="pt")


def tiny_flux_pipeline(seed: int = 0, true_cfg_scale: float = 1.0) -> TinyPipelineCase:
    """FluxPipeline on prompt embeddings; ``true_cfg_scale > 1`` adds a separate negative call per step."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(seed)
    transformer = tiny_flux_transformer()
    vae = _tiny_vae(2, shift_factor=0.1)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    g = _gen(seed + 1)
    kw = dict(
        prompt_embeds=torch.randn(1, 8, 32, generator=g),
        pooled_prompt_embeds=torch.randn(1, 16, generator=g),
        height=16, width=16, guidance_scale=1.0, output_type="pt",
    )
    if true_cfg_scale > 1.0:
        kw.update(
            negative_prompt_embeds=torch.randn(1, 8, 32, generator=g),
            negative_pooled_prompt_embeds=torch.randn(1, 16, generator=g),
            true_cfg_scale=true_cfg_scale,
        )
    return pipe, kw


def tiny_wan_pipeline(seed: int = 0, guidance_scale: float = 5.0, two_experts: bool = False) -> TinyPipelineCase:
    """WanPipeline (video): classifier-free guidance as two separate transformer calls per step. With
    ``two_experts`` (Wan 2.2) ``transformer`` denoises the high-noise half and ``transformer_2`` the rest."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(seed)
    z = 4
    transformer = tiny_wan_transformer()
    vae = AutoencoderKLWan(
        base_dim=4, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * z, latents_std=[1.0] * z,
    ).eval()
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
        **(dict(transformer_2=tiny_wan_transformer(), boundary_ratio=0.5) if two_experts else {}),
    )
    pipe.set_progress_bar_config(disable=True)
    g = _gen(seed + 1)
    kw = dict(
        prompt_embeds=torch.randn(1, 8, 16, generator=g),
        negative_prompt_embeds=torch.randn(1, 8, 16, generator=g),
        height=32, width=32, num_frames=5, guidance_scale=guidance_scale, output_type="pt",
    )
    return pipe, kw


def tiny_sd3_pipeline(seed: int = 0, guidance_scale: float = 4.0) -> TinyPipelineCase:
    """StableDiffusion3Pipeline on prompt embeddings: batched CFG (one call per step with a doubled batch)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = tiny_sd3_transformer()
    vae = _tiny_vae(4, shift_factor=0.1)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    g = _gen(seed + 1)
    kw = dict(
        prompt_embeds=torch.randn(1, 6, 16, generator=g),
        pooled_prompt_embeds=torch.randn(1, 16, generator=g),
        negative_prompt_embeds=torch.randn(1, 6, 16, generator=g),
        negative_pooled_prompt_embeds=torch.randn(1, 16, generator=g),
        height=16, width=16, guidance_scale=guidance_scale, output_type="pt",
    )
    return pipe, kw


def tiny_pixart_pipeline(seed: int = 0, guidance_scale: float = 4.5) -> TinyPipelineCase:
    """PixArtSigmaPipeline on prompt embeddings and attention masks: batched CFG."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    torch.manual_seed(seed)
    transformer = tiny_pixart_transformer()
    vae = _tiny_vae(4)
    pipe = PixArtSigmaPipeline(
        tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=DPMSolverMultistepScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    g = _gen(seed + 1)
    mask = torch.ones(1, 6, dtype=torch.long)
    mask[:, 4:] = 0
    kw = dict(
        prompt_embeds=torch.randn(1, 6, 24, generator=g), prompt_attention_mask=mask,
        negative_prompt_embeds=torch.randn(1, 6, 24, generator=g), negative_prompt_attention_mask=mask.clone(),
        negative_prompt=None, height=16, width=16, guidance_scale=guidance_scale, use_resolution_binning=False,
        output_type="pt",
    )
    return pipe, kw


TINY_PIPELINES: dict[str, Callable[..., TinyPipelineCase]] = {
    "dit": tiny_dit_pipeline,
    "flux": tiny_flux_pipeline,
    "wan": tiny_wan_pipeline,
    "sd3": tiny_sd3_pipeline,
    "pixart": tiny_pixart_pipeline,
}


def output_of(result) -> torch.Tensor:
    """The image/video tensor of a pipeline result (``output_type="pt"``)."""
    for name in ("images", "frames"):
        value = getattr(result, name, None)
        if value is not None:
            return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    raise TypeError(f"no images/frames in {type(result).__name__}")


def tiny_flux_controlnet_pipeline(seed: int = 0, control_guidance_end: float = 0.5) -> TinyPipelineCase:
    """FluxControlNetPipeline whose ControlNet stops guiding at ``control_guidance_end`` of the steps: what
    conditions the blocks jumps there (the ControlNet residuals drop to zero)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlNetModel, FluxControlNetPipeline

    torch.manual_seed(seed)
    transformer = tiny_flux_transformer()
    controlnet = FluxControlNetModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    with torch.no_grad():  # ControlNet zero-inits its output blocks: give them weights so that it guides
        for p in controlnet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.3)
    vae = _tiny_vae(2, shift_factor=0.1)
    pipe = FluxControlNetPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=transformer, controlnet=controlnet,
    )
    pipe.set_progress_bar_config(disable=True)
    g = _gen(seed + 1)
    kw = dict(
        prompt_embeds=torch.randn(1, 8, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 16, generator=g),
        control_image=torch.rand(1, 3, 16, 16, generator=g), controlnet_conditioning_scale=1.0,
        control_guidance_end=control_guidance_end, height=16, width=16, guidance_scale=1.0, output_type="pt",
    )
    return pipe, kw
