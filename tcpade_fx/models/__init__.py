"""Bundled trained models: class-conditional MNIST rectified-flow pipelines, loaded offline with one call.

    pipe = tcpade_fx.models.load("mnist-dit")        # or "mnist-flux"
    images = pipe([0, 1, 2], num_inference_steps=28).images
"""

from __future__ import annotations

from pathlib import Path

import torch

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MODELS = {"mnist-dit": "MNISTDiTPipeline", "mnist-flux": "MNISTFluxPipeline"}


def available() -> list[str]:
    """Names of the bundled models whose weights are present."""
    return [name for name in MODELS if (WEIGHTS_DIR / name / "model_index.json").exists()]


def load(name: str = "mnist-dit", dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load a bundled pipeline (EMA weights shipped in fp16, cast to ``dtype``)."""
    from . import mnist

    if name not in MODELS:
        raise ValueError(f"unknown bundled model {name!r}; choose one of {sorted(MODELS)}")
    path = WEIGHTS_DIR / name
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(
            f"weights of {name!r} are missing at {path}; train them with "
            f"`python examples/train_mnist.py --model {name.split('-')[1]}`"
        )
    import diffusers.utils.logging as dlog

    verbosity = dlog.get_verbosity()
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    try:
        pipe = getattr(mnist, MODELS[name]).from_pretrained(str(path), dtype=dtype)
    finally:
        dlog.set_verbosity(verbosity)
        dlog.enable_progress_bar()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


__all__ = ["MODELS", "available", "load"]
