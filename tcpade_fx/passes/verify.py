"""Check, on the captured inputs, that the split and the rewrite reproduce the original graph."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

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


def _run(what: str, gm: Callable, leaves: Sequence[Any], plan: BlockStackPlan | None = None):
    """Run a transformed graph; a failure (e.g. a residual input whose shape does not match) is a wrong plan."""
    try:
        return gm(*leaves)
    except Exception as exc:  # shape/dtype errors from a wrong plan surface here as torch errors of many kinds
        where = "" if plan is None else f" (body {plan.prefixes}, input {plan.body_input}, output {plan.body_output})"
        raise VerificationError(f"{what} fails on the captured inputs{where}: {type(exc).__name__}: {exc}") from exc


def eager_outputs(module: torch.nn.Module, kwargs: dict, forward: Callable | None = None) -> list[torch.Tensor]:
    """The tensor outputs of one eager call of ``forward`` (default: the class's own forward of ``module``), the
    reference every verification compares against."""
    from torch.utils import _pytree as pytree

    run = forward if forward is not None else type(module).forward.__get__(module)
    with torch.no_grad():
        return [t for t in pytree.tree_leaves(run(**kwargs)) if isinstance(t, torch.Tensor)]


def _finite_reference(original: torch.fx.GraphModule, leaves: Sequence[Any]) -> list[torch.Tensor]:
    ref = _tensors(original(*leaves))
    if not all(bool(torch.isfinite(r).all()) for r in ref if r.is_floating_point()):
        raise VerificationError(
            "the transformer's own output is not finite (NaN/Inf) on the first call's inputs, so the rewrite cannot "
            "be verified: check the inputs (latents, embeddings, timestep) and the model dtype"
        )
    return ref


def verify_split(original: torch.fx.GraphModule, split: torch.fx.GraphModule, leaves: Sequence[Any]) -> None:
    """The head/body/tail split must give the original outputs bit for bit."""
    with torch.no_grad():
        ref = _finite_reference(original, leaves)
        got = _tensors(_run("the head/body/tail split", split, leaves))
    if len(ref) != len(got) or not all(torch.equal(r, g) for r, g in zip(ref, got)):
        raise VerificationError("the head/body/tail split does not reproduce the original output bit for bit")


@dataclass
class Verification:
    """What :func:`check_rewrite` ran and found: the compute graph's outputs on the checked inputs (they serve the
    call that was captured), its residual, and how far each graph is from the reference."""

    outputs: list[Any]  # the compute graph's flat outputs, residual excluded
    residual: torch.Tensor
    compute_difference: float  # relative; 0.0 when bit for bit
    predict_difference: float  # relative, predict given the true residual
    stack_input: torch.Tensor | None = None  # input_gate graphs: the block stack's input (float32)


def neutral_gate(residual: torch.Tensor) -> torch.Tensor:
    """Input-gate terms under which the gated predict graph steps with ``residual`` itself (no direction, guided =
    residual): what the verification feeds it."""
    gate = torch.zeros(4, *residual.shape, dtype=torch.float32, device=residual.device)
    gate[0].copy_(residual)
    return gate


def check_rewrite(
    reference: Sequence[torch.Tensor],
    compute: Callable,
    predict: Callable,
    leaves: Sequence[Any],
    plan: BlockStackPlan,
    *,
    exact: bool = True,
    tolerance: float | None = None,
    input_gate: bool = False,
) -> Verification:
    """``compute`` must reproduce ``reference`` (the transformer's tensor outputs on ``leaves``) bit for bit, or,
    with ``exact=False``, within ``tolerance``; ``predict`` fed the true residual must match it within
    ``tolerance`` (default 1e-4 relative for float32, 2e-2 otherwise). ``input_gate``: the graphs of
    ``Policy.input_gate`` (compute also returns the stack input; predict is fed :func:`neutral_gate` too).
    Raises :class:`VerificationError`."""
    shapes = {name: tuple(node.meta["val"].shape) for name, node in _named_values(compute, plan)}
    if len(shapes) == 2 and shapes[plan.body_input] != shapes[plan.body_output]:
        raise VerificationError(
            f"the located body is not a residual stack: its input {plan.body_input} has shape "
            f"{shapes[plan.body_input]}, its output {plan.body_output} has shape {shapes[plan.body_output]}"
        )
    ref = list(reference)
    if not all(bool(torch.isfinite(r).all()) for r in ref if r.is_floating_point()):
        raise VerificationError(
            "the transformer's own output is not finite (NaN/Inf) on the first call's inputs, so the rewrite cannot "
            "be verified: check the inputs (latents, embeddings, timestep) and the model dtype"
        )
    if tolerance is None:
        tolerance = 1e-4 if ref[0].dtype == torch.float32 else 2e-2
    with torch.no_grad():
        *outputs, residual = _run("the compute graph", compute, leaves, plan)
        stack_input = None
        if input_gate:
            *outputs, residual, stack_input = (*outputs, residual)
        outs = _tensors(outputs)
        if len(outs) != len(ref):
            raise VerificationError(f"the compute graph returns {len(outs)} tensors, the original {len(ref)}")
        exactly = all(torch.equal(r, o) for r, o in zip(ref, outs))
        compute_diff = 0.0 if exactly else max(relative_difference(r, o) for r, o in zip(ref, outs))
        if not exactly and (exact or not compute_diff <= tolerance):
            raise VerificationError(
                "the compute graph does not reproduce the original output bit for bit"
                + ("" if exact else f" (relative difference {compute_diff:.2e}, allowed {tolerance:.0e})")
            )
        if not torch.isfinite(residual).all():
            raise VerificationError("the block-stack residual is not finite on the captured inputs")
        extra = (residual, neutral_gate(residual)) if input_gate else (residual,)
        pred = _tensors(_run("the predict graph", predict, (*leaves, *extra), plan))
    worst = max(relative_difference(r, p) for r, p in zip(ref, pred))
    if not worst <= tolerance:
        raise VerificationError(
            f"the predict graph, given the true residual, differs from the original by {worst:.2e} (relative; "
            f"allowed {tolerance:.0e}): the located body ({plan.prefixes}, input {plan.body_input}, output "
            f"{plan.body_output}) is not a residual stack the tail depends on only through its output"
        )
    return Verification(list(outputs), residual, compute_diff, worst, stack_input)


def _named_values(gm, plan: BlockStackPlan):
    graph = getattr(gm, "graph", None)
    if graph is None:
        return []
    return [(n.name, n) for n in graph.nodes
            if n.name in (plan.body_input, plan.body_output) and isinstance(n.meta.get("val"), torch.Tensor)]


def verify_rewrite(
    original: torch.fx.GraphModule,
    compute: torch.fx.GraphModule,
    predict: torch.fx.GraphModule,
    leaves: Sequence[Any],
    plan: BlockStackPlan,
    tolerance: float | None = None,
) -> float:
    """``compute`` must equal the ``original`` graph exactly; ``predict`` fed the true residual must match it
    closely. Returns the relative difference of the predict path; raises :class:`VerificationError` otherwise."""
    with torch.no_grad():
        ref = _tensors(original(*leaves))
    return check_rewrite(ref, compute, predict, leaves, plan, tolerance=tolerance).predict_difference
