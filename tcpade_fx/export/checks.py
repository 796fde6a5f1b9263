"""How an exported graph pair is checked against the PyTorch transformer."""

from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

from ..passes.verify import eager_outputs, relative_difference


def reference_outputs(module: torch.nn.Module, leaves: list, in_spec) -> list[torch.Tensor]:
    """The transformer's own tensor outputs for a call given as flattened ``leaves`` (its class forward)."""
    _, kwargs = pytree.tree_unflatten(list(leaves), in_spec)
    return eager_outputs(module, kwargs)


def graph_errors(ref: list[torch.Tensor], outs: list[torch.Tensor], pred: list[torch.Tensor]) -> dict[str, float]:
    """Largest relative error of an exported compute graph's outputs, and of its predict graph's given the true
    residual, against the transformer's outputs ``ref``; each list must have as many tensors as ``ref``."""
    for name, got in (("compute", outs), ("predict", pred)):
        if len(got) != len(ref):
            raise RuntimeError(f"the {name} graph returned {len(got)} outputs, the transformer {len(ref)}")
    return {"compute": max(relative_difference(r, o) for r, o in zip(ref, outs)),
            "predict_true_residual": max(relative_difference(r, p) for r, p in zip(ref, pred))}
