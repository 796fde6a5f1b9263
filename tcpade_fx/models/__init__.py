"""Bundled trained models: class-conditional MNIST rectified-flow pipelines, loaded offline with one call.

    pipe = tcpade_fx.models.load("mnist-dit")        # or "mnist-flux"
    images = pipe([0, 1, 2], num_inference_steps=28).images

    pipe = tcpade_fx.models.load("mnist-wan")        # moving-digit video (WanTransformer3DModel)
    frames = pipe([0, 1, 2], num_inference_steps=28, output_type="pt").frames   # (3, 8, 1, 28, 28)

``mnist-dit-heldout`` (another seed and head layout: 8 heads of 16, 7 blocks; 70 CPU-minutes of training) is
:data:`HELDOUT`: nothing in the policy or the presets is chosen on it; it checks, after the fact, what was chosen on
the other two.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MODELS = {"mnist-dit": "MNISTDiTPipeline", "mnist-flux": "MNISTFluxPipeline", "mnist-wan": "MNISTWanPipeline",
          "mnist-dit-heldout": "MNISTDiTPipeline"}
#: the module of tcpade_fx.models that defines each pipeline
_MODULES = {"mnist-dit": "mnist", "mnist-flux": "mnist", "mnist-wan": "wan", "mnist-dit-heldout": "mnist"}
#: models kept out of every choice of the method (presets, policy defaults): the check that a gain is not tuned
HELDOUT = ("mnist-dit-heldout",)
_TRAIN = {
    "mnist-dit": "python examples/train_mnist.py --model dit",
    "mnist-dit-heldout": "python examples/train_mnist.py --model dit-heldout --seed 1",
    "mnist-flux": "python examples/train_mnist.py --model flux",
    "mnist-wan": "python examples/train_wan.py",
}


def available() -> list[str]:
    """Names of the bundled models whose weights are present."""
    return [name for name in MODELS if (WEIGHTS_DIR / name / "model_index.json").exists()]


def load(name: str = "mnist-dit", dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load a bundled pipeline (EMA weights shipped in fp16, cast to ``dtype``)."""
    if name not in MODELS:
        raise ValueError(f"unknown bundled model {name!r}; choose one of {sorted(MODELS)}")
    path = WEIGHTS_DIR / name
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(
            f"weights of {name!r} are missing at {path}; train them with `{_TRAIN[name]}`"
        )
    with quiet_loading():
        pipe = pipeline_class(MODELS[name]).from_pretrained(str(path), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def pipeline_class(class_name: str) -> type:
    """The class of a bundled pipeline by its class name (what a saved folder's ``model_index.json`` names)."""
    import importlib

    name = next((n for n, c in MODELS.items() if c == class_name), None)
    if name is None:
        raise ValueError(f"{class_name!r} is not a bundled pipeline class; they are {sorted(MODELS.values())}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), class_name)


@contextlib.contextmanager
def quiet_loading():
    """diffusers' loading messages and progress bars off for the block, restored after it."""
    import diffusers.utils.logging as dlog

    verbosity = dlog.get_verbosity()
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(verbosity)
        dlog.enable_progress_bar()


__all__ = ["HELDOUT", "MODELS", "available", "load", "pipeline_class", "quiet_loading"]
