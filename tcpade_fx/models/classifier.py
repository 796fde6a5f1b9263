"""A small MNIST CNN: class accuracy of generated digits, and the feature space for FD / KID."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

WEIGHTS = Path(__file__).resolve().parent / "weights" / "mnist-classifier.safetensors"


class DigitClassifier(nn.Module):
    """Conv(32) → Conv(64) → 128-d features → 10 logits, on images in [-1, 1] of shape (B, 1, 28, 28)."""

    feature_dim = 128

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, self.feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(self.feature_dim, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def load_classifier() -> DigitClassifier:
    """The bundled classifier (trained by examples/train_classifier.py), in eval mode."""
    from safetensors.torch import load_file

    if not WEIGHTS.exists():
        raise FileNotFoundError(f"{WEIGHTS} is missing; run `python examples/train_classifier.py` to create it")
    model = DigitClassifier()
    model.load_state_dict(load_file(str(WEIGHTS)))
    return model.eval()
