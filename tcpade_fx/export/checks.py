"""How an exported graph pair is checked against the PyTorch transformer."""

from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

from ..passes.verify import eager_outputs, neutral_gate, relative_difference


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


def drawn_gate(residual: torch.Tensor, stack_input: torch.Tensor) -> torch.Tensor:
    """Input-gate terms (``(4, *residual.shape)``, :data:`tcpade_fx.pade.GATE_TERMS`) under which the gated predict
    graph moves the prediction (the fitted λ near 0.5, the share strictly between 0 and 1): seeded, scaled like the
    residual and the stack input, for checking an exported gate against the PyTorch graph."""
    g = torch.Generator().manual_seed(0)
    r, x = residual.float().cpu(), stack_input.float().cpu()

    def noise(like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=g) * float(like.std().clamp_min(1e-6))

    v, w = noise(x), noise(x)
    return torch.stack([0.9 * r, 0.2 * noise(r), x + v, -2.0 * v + 0.5 * w]).to(residual.device)


def gated_predict_check(compute, predict, leaves: list, residual: torch.Tensor, stack_input: torch.Tensor,
                        run_exported) -> dict[str, float]:
    """Graphs of ``Policy.input_gate``: the exported compute graph's block-stack input against the PyTorch compute
    graph's, and the exported predict graph against the PyTorch one (``compute``/``predict``: the captured
    graphs, called on the call ``leaves``) under a :func:`drawn_gate` that moves the prediction.
    ``run_exported(gate)`` runs the exported predict graph on the leaves, ``residual`` and ``gate``."""
    gate = drawn_gate(residual, stack_input)
    with torch.no_grad():
        want_input = compute(*leaves)[-1]
        want = [t for t in predict(*leaves, residual, gate) if isinstance(t, torch.Tensor)]
    got = [t for t in run_exported(gate) if isinstance(t, torch.Tensor)]
    if len(got) != len(want):
        raise RuntimeError(f"the gated predict graph returned {len(got)} outputs, the PyTorch graph {len(want)}")
    return {"stack_input": relative_difference(want_input, stack_input.to(want_input.device)),
            "predict_gated": max(relative_difference(w, o.to(w.device)) for w, o in zip(want, got))}


def exported_pair_errors(input_gate: bool, compute, predict, leaves: list, ref: list[torch.Tensor], run_compute,
                         run_predict) -> dict[str, float]:
    """Errors of an exported compute/predict pair on the call ``leaves``: :func:`graph_errors` against the
    transformer's outputs ``ref`` (predict given the true residual, and with ``input_gate`` a neutral gate) and,
    with ``input_gate``, :func:`gated_predict_check` against the captured ``compute``/``predict`` graphs.
    ``run_compute()`` returns the exported compute graph's outputs, ``run_predict(*extra)`` the exported predict
    graph's given its inputs beyond the call (the residual, and the gate)."""
    got = list(run_compute())
    stack_input = got.pop() if input_gate else None
    *outs, residual = got
    if not input_gate:
        return graph_errors(ref, outs, run_predict(residual))
    gated = gated_predict_check(compute, predict, leaves, residual, stack_input,
                                lambda gate: run_predict(residual, gate))
    return {**graph_errors(ref, outs, run_predict(residual, neutral_gate(residual))), **gated}
