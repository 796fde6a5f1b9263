"""Check, on the captured inputs, that the split and the rewrite reproduce the original graph."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .locate import BlockStackPlan


class VerificationError(RuntimeError):
    """A transformed graph does not reproduce the original; nothing was installed."""


def _tensors(out) -> list[torch.Tensor]:
    out = out if isinstance(out, (tuple, list)) else [out]
    return [o for o in out if isinstance(o, torch.Tensor)]


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / (a.norm() + 1e-30))


def verify_split(original: torch.fx.GraphModule, split: torch.fx.GraphModule, leaves: Sequence[Any]) -> None:
    """The head/body/tail split must give the original outputs bit for bit."""
    with torch.no_grad():
        ref, got = _tensors(original(*leaves)), _tensors(split(*leaves))
    if len(ref) != len(got) or not all(torch.equal(r, g) for r, g in zip(ref, got)):
        raise VerificationError("the head/body/tail split does not reproduce the original output bit for bit")


def verify_rewrite(
    original: torch.fx.GraphModule,
    compute: torch.fx.GraphModule,
    predict: torch.fx.GraphModule,
    leaves: Sequence[Any],
    plan: BlockStackPlan,
    tolerance: float | None = None,
) -> float:
    """``compute`` must equal the original exactly; ``predict`` fed the true residual must match it closely.

    Returns the relative difference of the predict path; raises :class:`VerificationError` otherwise.
    """
    with torch.no_grad():
        ref = _tensors(original(*leaves))
        *outs, residual = compute(*leaves)
        outs = _tensors(outs)
        if len(outs) != len(ref) or not all(torch.equal(r, o) for r, o in zip(ref, outs)):
            raise VerificationError("the compute graph does not reproduce the original output bit for bit")
        if not torch.isfinite(residual).all():
            raise VerificationError("the block-stack residual is not finite on the captured inputs")
        pred = _tensors(predict(*leaves, residual))
    if tolerance is None:
        tolerance = 1e-4 if ref[0].dtype == torch.float32 else 2e-2
    worst = max(relative_difference(r, p) for r, p in zip(ref, pred))
    if not worst <= tolerance:
        raise VerificationError(
            f"the predict graph, given the true residual, differs from the original by {worst:.2e} (relative; "
            f"allowed {tolerance:.0e}): the located body ({plan.prefixes}, input {plan.body_input}, output "
            f"{plan.body_output}) is not a residual stack the tail depends on only through its output"
        )
    return worst
