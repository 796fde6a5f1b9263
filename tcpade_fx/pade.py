"""Numerics of TC-Padé: the shared-denominator [L/1] rational extrapolant and its polynomial / reuse special cases.

For history points ``(t_j, R_j)`` and a target ``t*`` (``τ_j = t_j − t_last``, ``τ* = t* − t_last``) we fit

    R(τ) ≈ P_L(τ) / (1 + b·τ)        one denominator coefficient ``b`` per tensor (or per batch element)

from the newest ``L + 2`` points: ``S_j = R_j·(1 + b·τ_j)`` is a degree-L polynomial, so the (L+1)-th divided
difference ``D`` annihilates it, ``D[R] + b·D[τR] = 0`` for every element, and least squares over the elements
gives ``b = −⟨D[R], D[τR]⟩ / (⟨D[τR], D[τR]⟩ + ε)``. The prediction is the Lagrange interpolant of ``S`` on the
newest ``L + 1`` nodes, evaluated at ``τ*`` and divided by ``1 + b·τ*``. ``b = 0`` is exactly polynomial
(Taylor-family) extrapolation of order L; one point is plain reuse.

Everything is computed in float32 on normalised data (times divided by the extrapolation span, residuals by their
largest magnitude), with pure tensor ops: no ``.item()`` and no Python branch on values, so the functions trace
under ``torch.compile`` and ``torch.export``. Safeguards, each a ``torch.where`` branch:

* ``b`` not finite, or ``1 + b·τ ≤ δ`` anywhere on ``[min τ_j, τ*]`` (a pole or a sign change): ``b = 0``;
* ``D[τR]`` at float32 rounding level (``b`` not identifiable, e.g. two equal residuals among three nodes): ``b = 0``;
* nodes closer than ``NODE_TOLERANCE`` of the span (repeated or nearly repeated times): reuse the last residual;
* fewer history points than the order needs: the highest order the history allows (decided on the static count).

Statistics over several processes (context parallelism: each holds some of the tokens of every residual). Every
statistic a decision or a prediction reads is split into a per-process share and a finish: the denominator fit
(:func:`denominator_partials`, then ``extrapolate_stacked(..., fit=...)``), the relative error
(:func:`relative_error_partials`, :func:`relative_error_from`), the modulation fit (:func:`modulation_partials`,
:func:`modulation_from`) and finiteness (:func:`nonfinite_partial`). Shares are normalised by the process's own
largest magnitude and carry it, so that combining them (:class:`StatPack`, over a :class:`StatReducer`: the base
class is one process and combines nothing) rescales to the global one without overflow: the combination is the
statistic of the whole tensor, and with one process it is the process's own bit for bit. The public functions
(:func:`relative_error`, :func:`fit_modulation`, :func:`extrapolate_stacked` without ``fit``) are share and finish
on one process.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
import torch

Tensor = torch.Tensor

#: Nodes closer than this fraction of the extrapolation span are treated as repeated (fall back to reuse).
NODE_TOLERANCE = 1e-3
_TINY = 1e-30
#: A divided difference D[τR] whose RMS is within this many times n float32 ulps of zero is rounding noise.
_ROUNDING_ULPS = 4.0


def needed_nodes(method: str, order: int) -> int:
    """History points an extrapolant of this method and order uses."""
    if method == "reuse":
        return 1
    return order + 2 if method == "pade" else order + 1


def effective_order(method: str, order: int, available: int) -> int:
    """The order actually used with ``available`` history points (highest the history allows); -1 means reuse."""
    if available < 1:
        raise ValueError("extrapolation needs at least one history point")
    if method == "reuse" or available == 1:
        return -1 if method == "pade" or method == "reuse" else 0
    if method == "pade":
        return min(order, available - 2)
    return min(order, available - 1)


def _flatten(r: Tensor, per_sample: bool) -> Tensor:
    r = r.float()
    if per_sample and r.dim() > 0:
        return r.reshape(r.shape[0], -1)
    return r.reshape(1, -1)


def _node_scale(taus: Tensor, target: Tensor) -> Tensor:
    span = torch.maximum(taus.abs().amax(), target.abs())
    return torch.clamp(span, min=_TINY)


def _divided_difference_weights(u: Tensor) -> Tensor:
    """Weights w_j with D[f] = Σ w_j f_j, normalised to max |w_j| = 1 (D is only needed up to scale)."""
    n = u.shape[0]
    diffs = u.unsqueeze(1) - u.unsqueeze(0) + torch.eye(n, dtype=u.dtype, device=u.device)
    prod = diffs.prod(dim=1)
    safe = torch.where(prod == 0, torch.ones_like(prod), prod)
    w = torch.where(prod == 0, torch.zeros_like(prod), 1.0 / safe)
    w = torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0)
    return w / torch.clamp(w.abs().amax(), min=_TINY)


def _lagrange_weights(u: Tensor, at: Tensor) -> Tensor:
    """ℓ_j(at) for the nodes ``u`` (assumed distinct; degenerate nodes are filtered by the caller)."""
    n = u.shape[0]
    if n == 1:
        return torch.ones(1, dtype=u.dtype, device=u.device)
    eye = torch.eye(n, dtype=u.dtype, device=u.device)
    num = (at - u).unsqueeze(0).expand(n, n) * (1 - eye) + eye  # row j: (at − u_i) for i ≠ j
    den = (u.unsqueeze(1) - u.unsqueeze(0)) * (1 - eye) + eye
    den = torch.where(den == 0, torch.ones_like(den), den)
    return num.prod(dim=1) / den.prod(dim=1)


def _nodes_distinct(u: Tensor) -> Tensor:
    n = u.shape[0]
    if n == 1:
        return torch.ones((), dtype=torch.bool, device=u.device)
    gaps = (u.unsqueeze(1) - u.unsqueeze(0)).abs() + torch.eye(n, dtype=u.dtype, device=u.device) * 2.0
    return gaps.amin() >= NODE_TOLERANCE


def _as_times(times: Sequence[float] | Tensor, device: torch.device) -> Tensor:
    return torch.as_tensor(times, dtype=torch.float32, device=device).reshape(-1)


def fit_denominator(
    times: Sequence[float] | Tensor,
    residuals: Sequence[Tensor],
    target: float | Tensor,
    *,
    per_sample: bool = True,
    eps: float = 1e-8,
    pole_margin: float = 0.1,
) -> Tensor:
    """The shared denominator coefficient ``b`` (in the units of ``1 / time``) fitted from all given points.

    Returns shape ``(B,)`` when ``per_sample`` else ``(1,)``. A fit that is not finite, or whose denominator
    ``1 + b·τ`` falls to ``pole_margin`` or below between the oldest node and the target, returns 0.
    Needs at least two points.
    """
    if len(residuals) < 2:
        raise ValueError("fitting a denominator needs at least two history points")
    _require_finite_history(residuals)
    device = residuals[-1].device
    t = _as_times(times, device)
    tau = t - t[-1]
    tau_star = torch.as_tensor(target, dtype=torch.float32, device=device).reshape(()) - t[-1]
    h = _node_scale(tau, tau_star)
    b_hat = _fit_normalised(tau / h, stack_history(residuals, per_sample), tau_star / h, eps, pole_margin)
    return b_hat / h


def stack_history(residuals: Sequence[Tensor], per_sample: bool = True) -> Tensor:
    """The history as one float32 tensor of shape (n, B, F) (B = 1 unless ``per_sample``), oldest first, in one
    copy: what :func:`extrapolate_stacked` takes. A runtime that keeps it between predictions saves a copy per step."""
    return torch.stack([_flatten(r, per_sample) for r in residuals])


def _fit_partials(u: Tensor, stacked: Tensor, slots: Sequence[int] | None = None) -> Tensor:
    """This process's share of the denominator fit: per batch row (B, 3) ``[scale, ⟨D[R], D[τR]⟩, ⟨D[τR], D[τR]⟩]``,
    the dot products of the data normalised by ``scale`` (the largest magnitude), i.e. in units of ``scale²``.
    ``slots``: the rows of ``stacked`` (a ring, any float dtype: read in float32) that hold the nodes, oldest first;
    default: all rows in order."""
    k, batch, _ = stacked.shape
    slots = range(k) if slots is None else slots
    # max |R| per sample, without materialising |R| (much faster on CPU than vector_norm(ord=inf, dim=(0, 2)))
    scale = torch.stack([torch.maximum(stacked[s].amax(dim=1), stacked[s].amin(dim=1).neg()) for s in slots])
    scale = scale.amax(dim=0).float()
    inv = 1.0 / torch.clamp(scale, min=_TINY)
    w = _divided_difference_weights(u)
    # D[R] and D[τR] in one matmul over the ring; its slot order is handled by the weights, zero on the slots that
    # are not nodes (no re-stacking, and no index tensor copied to the device)
    weights = torch.zeros(2, k, dtype=torch.float32, device=stacked.device)
    for j, s in enumerate(slots):
        weights[0, s] = w[j]
        weights[1, s] = w[j] * u[j]
    d = (weights @ stacked.reshape(k, -1).float()).reshape(2, batch, -1) * inv[None, :, None]
    d_r, d_ur = d[0], d[1]
    return torch.stack([scale, torch.linalg.vecdot(d_r, d_ur, dim=1), torch.linalg.vecdot(d_ur, d_ur, dim=1)], 1)


def _fit_finish(partials: Tensor, count: int | Tensor, u: Tensor, u_star: Tensor, eps: float,
                pole_margin: float) -> Tensor:
    """``b`` from the (global) fit statistics: :func:`_fit_partials`' and ``count``, the elements per batch row."""
    n = u.shape[0]
    num, energy = partials[:, 1], partials[:, 2]
    b = -num / (energy + eps)
    # D[τR] at float32 rounding level (each of its elements sums n terms of magnitude <= 1, so rounding leaves up to
    # ~n ulps): b is not identifiable from the data (exact arithmetic gives ±∞ or 0/0) and -num/(energy + eps) is
    # rounding noise over eps, which can land anywhere, inside the pole guard's range too.
    noise = count * (_ROUNDING_ULPS * n * torch.finfo(torch.float32).eps) ** 2
    # 1 + b·u is linear: its minimum over the hull of the nodes and the target is at one of its ends. Diffusion
    # times decrease (u_j ≥ 0 ≥ u*), so the oldest node u.amax() is an end as much as u.amin() and u*.
    lowest = torch.minimum(torch.minimum(1.0 + b * u.amin(), 1.0 + b * u.amax()), 1.0 + b * u_star)
    ok = torch.isfinite(b) & (lowest > pole_margin) & _nodes_distinct(u) & (energy > noise)
    return torch.where(ok, b, torch.zeros_like(b))


def _fit_normalised(u: Tensor, stacked: Tensor, u_star: Tensor, eps: float, pole_margin: float) -> Tensor:
    return _fit_finish(_fit_partials(u, stacked), stacked.shape[2], u, u_star, eps, pole_margin)


def extrapolate(
    times: Sequence[float] | Tensor,
    residuals: Sequence[Tensor],
    target: float | Tensor,
    *,
    method: str = "pade",
    order: int = 1,
    per_sample: bool = True,
    eps: float = 1e-8,
    pole_margin: float = 0.1,
    damping: float | Tensor = 1.0,
    modulation: float | Tensor = 1.0,
) -> Tensor:
    """Predict the residual at time ``target`` from the history ``(times[j], residuals[j])``, oldest first.

    Args:
        times: the model times of the history points (any affine time scale; only differences matter).
        residuals: tensors of one shape; dim 0 is the batch when ``per_sample``.
        target: the time to predict at.
        method: ``"pade"`` ([L/1] with a shared denominator), ``"taylor"`` (polynomial of order L) or ``"reuse"``.
        order: L; the history's newest ``L + 2`` (Padé) or ``L + 1`` (Taylor) points are used, fewer if absent.
        per_sample: fit the denominator per batch element.
        eps, pole_margin: see :func:`fit_denominator`.
        damping: λ in ``R_last + λ·(R̂ − R_last)``; 1 is the undamped extrapolant.
        modulation: μ, a scalar or one per batch element, in ``R̂ = T + μ·(P − T)`` with ``P`` the Padé and ``T``
            the polynomial (b = 0) extrapolant on the same nodes; 1 is plain Padé. Ignored by the other methods.

    Returns:
        The prediction, in the dtype of the residuals, clamped to that dtype's finite range.

    Raises:
        ValueError: a history residual has NaN or infinite values (not checked while traced).
    """
    if len(residuals) == 0:
        raise ValueError("extrapolation needs at least one history point")
    if len(times) != len(residuals):
        raise ValueError(f"got {len(times)} times for {len(residuals)} residuals")
    _require_finite_history(residuals)
    last = residuals[-1]
    method_used, l_eff = _resolve(method, order, len(residuals))
    n_fit = needed_nodes(method_used, l_eff) if l_eff >= 0 else 1
    if n_fit == 1:  # reuse, and Taylor-0 (which is reuse): exact, in the input dtype (no float32 round trip)
        return last.clone()
    times = list(times)[-n_fit:] if not isinstance(times, Tensor) else times[-n_fit:]
    stacked = stack_history(residuals[-n_fit:], per_sample)
    kw = dict(like=last, method=method, order=order, eps=eps, pole_margin=pole_margin, damping=damping,
              modulation=modulation)
    pred = extrapolate_stacked(times, stacked, target, **kw)
    if not torch.compiler.is_compiling() and not all_finite(pred):
        # float32 overflowed (inf − inf gives NaN): the same coefficients in float64 give the value's true sign
        pred = extrapolate_stacked(times, stacked, target, accumulate=torch.float64, **kw)
    return _saturate(pred)


def _nodes(times, n_have: int, target, method: str, order: int, device) -> tuple:
    """What an extrapolation of ``method``/``order`` from ``n_have`` points uses: (method, L, nodes, u, u*) with
    ``u``/``u*`` the normalised times of the newest nodes and the target (None where it is plain reuse).

    Times given as Python numbers (what the runtime has) are normalised on the host (:func:`_host_nodes`, the same
    float32 operations) and reach ``device`` in one non-blocking copy: a tensor built from Python numbers directly on
    a CUDA device would be a blocking copy, a host sync per extrapolation."""
    if len(times) != n_have:
        raise ValueError(f"got {len(times)} times for {n_have} stacked residuals")
    method, l_eff = _resolve(method, order, n_have)
    n_fit = needed_nodes(method, l_eff) if l_eff >= 0 else 1
    if n_fit == 1:
        return method, l_eff, 1, None, None
    if isinstance(times, Tensor) or isinstance(target, Tensor):
        t = _as_times(times, device)[-n_fit:]
        tau = t - t[-1]
        tau_star = torch.as_tensor(target, dtype=torch.float32, device=device).reshape(()) - t[-1]
        h = _node_scale(tau, tau_star)
        return method, l_eff, n_fit, tau / h, tau_star / h
    nodes = to_device(_host_nodes(tuple(float(x) for x in list(times)[-n_fit:]), float(target)), device)
    return method, l_eff, n_fit, nodes[:-1], nodes[-1]


@functools.lru_cache(maxsize=256)
def _host_nodes(times: tuple[float, ...], target: float) -> Tensor:
    """``[u_0, ..., u_{n-1}, u*]`` on the host (float32, as on the device): a step's nodes, computed once per step
    and shared by the fit, the prediction and the check. Read-only (cached): :func:`to_device` copies it."""
    t = torch.tensor(times, dtype=torch.float32)
    tau = t - t[-1]
    tau_star = torch.tensor(target, dtype=torch.float32) - t[-1]
    h = _node_scale(tau, tau_star)
    return torch.cat([tau / h, (tau_star / h).reshape(1)])


def to_device(host: Tensor, device: torch.device | str) -> Tensor:
    """``host`` (a CPU tensor) on ``device`` without a host sync: a copy of it on the CPU, a non-blocking copy from
    pinned memory on CUDA (PyTorch's caching host allocator keeps the pinned buffer alive until the copy is done)."""
    device = torch.device(device)
    if device.type == "cpu":
        return host.clone()
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def _float32_complement(x: float) -> float:
    """``1 − x`` rounded as float32 arithmetic rounds it (what ``1 − tensor(x)`` gives), as a Python float."""
    return float(np.float32(1.0) - np.float32(x))


def denominator_partials(
    times: Sequence[float] | Tensor, stacked: Tensor, target: float | Tensor, *, method: str = "pade", order: int = 1,
    slots: Sequence[int] | None = None,
) -> tuple[Tensor, int] | None:
    """This process's share of the denominator fit that ``extrapolate_stacked(times, stacked, target, method=...,
    order=...)`` makes: ``(partials, count)`` with ``partials`` of shape (B, 3), ``[scale, ⟨D[R], D[τR]⟩,
    ⟨D[τR], D[τR]⟩]`` in units of ``scale²`` (combine with ``"scaled"``, :class:`StatPack`), and ``count`` the
    elements per batch row (combine with ``"sum"``). None where that extrapolant fits no denominator.

    With the history split across processes (context parallelism: each holds some of the tokens), the combined
    statistics are those of the whole history, and ``extrapolate_stacked(..., fit=combined)`` gives every process
    the same ``b``. ``slots``: as for :func:`extrapolate_stacked`.
    """
    n_have = stacked.shape[0] if slots is None else len(slots)
    method, _, n_fit, u, _ = _nodes(times, n_have, target, method, order, stacked.device)
    if method != "pade" or n_fit == 1:
        return None
    if slots is not None:
        return _fit_partials(u, stacked, list(slots)[-n_fit:]), int(stacked.shape[2])
    return _fit_partials(u, stacked[-n_fit:]), int(stacked.shape[2])


def extrapolate_stacked(
    times: Sequence[float] | Tensor,
    stacked: Tensor,
    target: float | Tensor,
    *,
    like: Tensor,
    method: str = "pade",
    order: int = 1,
    eps: float = 1e-8,
    pole_margin: float = 0.1,
    damping: float | Tensor = 1.0,
    modulation: float | Tensor = 1.0,
    accumulate: torch.dtype = torch.float32,
    fit: tuple[Tensor, Tensor | int] | None = None,
    slots: Sequence[int] | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """:func:`extrapolate` on a history already stacked by :func:`stack_history` (``per_sample`` is its B).

    ``like`` is the newest residual (shape and dtype of the result; returned as a copy where the history allows
    only reuse). Only the newest points the method and order need are read. Unlike :func:`extrapolate` the result
    is not clamped: where the combination overflows (or the dtype of ``like`` cannot hold it) it is not finite,
    for the caller to see (the runtime then steps with the newest computed residual, :func:`replace_nonfinite_`). ``accumulate``: the dtype of the weighted sum of
    the residuals (the fit is float32 either way); float64 holds sums beyond float32's range. ``fit``: the
    denominator statistics to fit ``b`` from (:func:`denominator_partials`, combined over the processes that hold
    the rest of the history); default: this history's own.

    ``slots``: ``stacked`` is a ring of preallocated slots (any dtype; read in float32) and the history is
    ``stacked[slots[0]], stacked[slots[1]], ...``, oldest first: the slot order is handled by the weights and
    indices, the ring is never re-stacked (so that its storage stays put, as CUDA graphs need). ``out``: a tensor of
    the shape and dtype of ``like`` to write the prediction into (and return), for a static input to the predict
    graph.
    """
    out_dtype = like.dtype
    device = stacked.device
    n_have = stacked.shape[0] if slots is None else len(slots)
    method, l_eff, n_fit, u, u_star = _nodes(times, n_have, target, method, order, device)
    if n_fit == 1:
        return like.clone() if out is None else out.copy_(like)
    if slots is None:
        stacked = stacked[-n_fit:]
        rows = list(stacked.unbind(0))
        fit_slots = None
    else:
        fit_slots = list(slots)[-n_fit:]
        rows = [stacked[s] for s in fit_slots]
    n_batch = stacked.shape[1]

    u_lag = u[-(l_eff + 1):]
    ell = _lagrange_weights(u_lag, u_star)  # (L+1,)
    if method == "pade":
        partials, count = fit if fit is not None else (_fit_partials(u, stacked, fit_slots), stacked.shape[2])
        b = _fit_finish(partials, count, u, u_star, eps, pole_margin)
        coeff = ell[None, :] * (1.0 + b[:, None] * u_lag[None, :]) / (1.0 + b[:, None] * u_star)  # (B, L+1)
        # T + μ·(P − T) is linear in the coefficients, and T's coefficients are the Lagrange weights
        if isinstance(modulation, Tensor):
            mu = modulation.to(device=device, dtype=torch.float32).reshape(-1, 1)
            coeff = mu * coeff + (1.0 - mu) * ell[None, :]  # exactly Padé's coefficients at μ = 1
        else:  # a Python number: a kernel argument, no tensor copied to the device
            coeff = float(modulation) * coeff + _float32_complement(modulation) * ell[None, :]
    else:
        coeff = ell[None, :].expand(n_batch, -1)
    # the safeguards and the damping act on the coefficients, not on the tensors: R̃ = Σ c_j R_j in one pass
    reuse = torch.zeros_like(coeff)
    reuse[:, -1] = 1.0
    coeff = torch.where(_nodes_distinct(u), coeff, reuse)
    if isinstance(damping, Tensor):
        lam = damping.to(device=device, dtype=torch.float32)
        coeff = lam * coeff + (1.0 - lam) * reuse
    else:
        coeff = float(damping) * coeff + _float32_complement(damping) * reuse
    lag = [r.to(accumulate) for r in rows[-(l_eff + 1):]]
    if out is not None and out.dtype == accumulate and out.is_contiguous():
        pred = out.view(lag[0].shape)  # accumulate in place: the same storage every step
        torch.mul(coeff[:, :1], lag[0], out=pred)
    else:
        pred = coeff[:, :1] * lag[0]
    for j in range(1, l_eff + 1):
        pred = pred.add_(coeff[:, j:j + 1] * lag[j]) if out is not None else pred + coeff[:, j:j + 1] * lag[j]
    # no clamp and no nan_to_num here: a combination that overflows stays non-finite, so that the runtime sees it
    # (replace_nonfinite_) and steps with the newest computed residual instead of a saturated or zeroed one
    if out is not None:
        return out if pred.data_ptr() == out.data_ptr() else out.copy_(pred.reshape(like.shape))
    return pred.reshape(like.shape).to(out_dtype)


#: The input gate's terms, in the order of its buffer (:func:`input_gate_terms`, :func:`input_gated_residual`).
GATE_TERMS = ("guided", "guided_direction", "input_fit", "input_direction")
#: Nodes the input gate fits over (the newest ones of the history).
GATE_NODES = 3


@functools.lru_cache(maxsize=256)
def input_gate_weights(times: tuple[float, float, float], target: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Node weights of the input gate on three nodes ``times`` (oldest first) and the target ``t*``, on the host in
    float64: ``base`` = Taylor-1 on the newest two, and ``direction`` = Taylor-2 (Lagrange on all three) − Taylor-1.

    Every ``base + λ·direction`` keeps ``Σ w = 1`` and ``Σ w·t_i = t*``; λ = 0 is Taylor-1, λ = 1 Taylor-2. Nodes
    closer than :data:`NODE_TOLERANCE` of their span give ``direction = 0`` (the gate then keeps the prior)."""
    t0, t1, t2 = (float(t) for t in times)
    t = float(target)
    span = max(abs(t2 - t0), abs(t - t0), _TINY)
    if min(abs(t1 - t0), abs(t2 - t1)) <= NODE_TOLERANCE * span:
        return (0.0, 0.0, 1.0), (0.0, 0.0, 0.0)
    theta = (t - t2) / (t2 - t1)
    base = (0.0, -theta, 1.0 + theta)
    ts = (t0, t1, t2)
    lagrange = [math.prod((t - ts[j]) / (ts[i] - ts[j]) for j in range(3) if j != i) for i in range(3)]
    return base, tuple(lagrange[i] - base[i] for i in range(3))


def input_gate_terms(
    times: Sequence[float], residuals: Tensor, inputs: Tensor, target: float, *, prior: Tensor,
    slots: Sequence[int] | None = None, out: Tensor | None = None,
) -> Tensor:
    """What :func:`input_gated_residual` needs from the history, as one ``(4, rows, F)`` float32 tensor (order
    :data:`GATE_TERMS`): the base weights' residual ``Σ b_i R_i`` and input ``Σ b_i x_i`` and the direction's
    ``Σ d_i R_i`` and ``Σ d_i x_i`` (:func:`input_gate_weights`) over the newest :data:`GATE_NODES` points.

    ``residuals``/``inputs``: the computed residuals and block-stack inputs, ``(K, rows, F)`` rings read through
    ``slots`` (oldest first) as in :func:`extrapolate_stacked`. With fewer than three points the terms are
    neutral (direction zero, guided = ``prior``): the gated residual is then ``prior`` itself. ``out``: a static
    buffer to write into."""
    n_have = residuals.shape[0] if slots is None else len(slots)
    if len(times) != n_have:
        raise ValueError(f"got {len(times)} times for {n_have} stacked residuals")
    picked = list(range(n_have)) if slots is None else list(slots)
    rows, width = residuals.shape[1], residuals.shape[2]
    if out is None:
        out = torch.empty(4, rows, width, dtype=torch.float32, device=residuals.device)
    if n_have < GATE_NODES:
        out[0].copy_(prior.reshape(rows, width))
        out[1:].zero_()
        return out
    base, direction = input_gate_weights(tuple(float(t) for t in list(times)[-GATE_NODES:]), float(target))
    nodes = picked[-GATE_NODES:]
    for k, (ring, weights) in enumerate(((residuals, base), (residuals, direction),
                                         (inputs, base), (inputs, direction))):
        terms = [(node, w) for node, w in zip(nodes, weights) if w != 0.0] or [(nodes[-1], 0.0)]
        (first, w0), rest = terms[0], terms[1:]  # one pass per node with a weight (base's oldest has none)
        torch.mul(ring[first].float(), w0, out=out[k])
        for node, w in rest:
            out[k].add_(ring[node].float(), alpha=w)
    return out


def input_gated_residual(prior: Tensor, gate: Tensor, stack_input: Tensor, *, per_sample: bool = True) -> Tensor:
    """The residual predicted for a step whose block-stack input ``x`` is known (the head ran): ``prior`` (the
    extrapolated residual) moved toward ``Σ w_i R_i``, with node weights ``w = base + λ·direction`` that reproduce
    ``x`` from the history's inputs as well as the one free parameter allows (λ ∈ [0, 1]: between Taylor-1 and
    Taylor-2), as far as that fit explains the input:

        λ = clamp(−⟨B − x, D⟩ / ⟨D, D⟩, 0, 1)                  B = Σ b_i x_i, D = Σ d_i x_i (``gate``)
        share = clamp(1 − ‖B − x + λD‖² / ‖B − x‖², 0, 1)      how much of Taylor-1's miss of x the fit removes
        R̂ = prior + share · (Σ b_i R_i + λ Σ d_i R_i − prior)

    Why: to first order ``R(x, t) ≈ R_0 + J (x − x_0) + g (t − t_0)``, so weights with ``Σ w = 1``,
    ``Σ w t_i = t`` and ``Σ w x_i = x`` reproduce ``R`` whatever the Jacobian ``J``; the share keeps the prior where
    the history cannot reproduce ``x`` (and the argument does not hold). One λ and share per batch element with
    ``per_sample`` (else one for the tensor). Tensor ops only (it runs inside the predict graph); finite terms give
    a finite result (the inner products are taken on data scaled by its largest magnitude; a degenerate fit gives
    share 0, i.e. ``prior``). Measured: bench/ADAPTIVE_STUDY.md section 10 (``pade-mod-gated``)."""
    rows = prior.shape[0] if per_sample else 1
    p = prior.reshape(rows, -1).float()
    terms = gate.reshape(4, rows, -1)
    guided, guided_direction, input_fit, input_direction = terms.unbind(0)
    miss = input_fit - stack_input.reshape(rows, -1).float()
    # the Gram matrix of (B − x, D) per row, on data scaled by its largest magnitude (finite for any finite data);
    # ‖B − x + λD‖² is then a quadratic in λ: the data are read a few times, not once per quantity
    scale = torch.stack((miss.amax(1, keepdim=True), -miss.amin(1, keepdim=True),
                         input_direction.amax(1, keepdim=True), -input_direction.amin(1, keepdim=True))).amax(0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    pair = torch.stack((miss, input_direction), dim=1) / scale.unsqueeze(-1)
    gram = torch.bmm(pair, pair.transpose(1, 2))
    mm, md, dd = gram[:, 0, 0:1], gram[:, 0, 1:2], gram[:, 1, 1:2]
    lam = -md / torch.where(dd > 0, dd, torch.ones_like(dd))
    lam = torch.nan_to_num(lam, nan=0.0, posinf=0.0, neginf=0.0).clamp(0.0, 1.0)
    left = (mm + 2.0 * lam * md + lam * lam * dd).clamp_min(0.0)
    share = 1.0 - left / torch.where(mm > 0, mm, torch.ones_like(mm))
    share = torch.where(mm > 0, share, torch.ones_like(share))  # x is Taylor-1's exactly: so is the residual
    share = torch.nan_to_num(share, nan=0.0, posinf=0.0, neginf=0.0).clamp(0.0, 1.0)
    out = torch.lerp(p, torch.addcmul(guided, guided_direction, lam), share)
    return out.reshape(prior.shape)


#: Nodes of the interpolant that re-estimates a gap's integral once its far end is computed: the two newest
#: computed residuals before the gap and the one that ends it (quadratic; measured against 2 in bench/ADAPTIVE_STUDY.md
#: section 12).
GAP_NODES = 3


def gap_integral_weights(node_times: Sequence[float], gap_times: Sequence[float],
                         gap_weights: Sequence[float]) -> list[float]:
    """Weights ``W_j`` such that ``Σ_j W_j R_j = Σ_k g_k I(t_k)``, ``I`` the polynomial interpolating the residuals
    ``R_j`` at ``node_times`` and ``g_k`` = ``gap_weights`` at ``gap_times``: the weighted sum of what a gap's steps
    would have stepped with, re-estimated by interpolation once the computed step that ends the gap is known.
    Exact for residuals that are polynomials of degree below ``len(node_times)`` in time.

    Host arithmetic in float64 on times shifted and scaled to the nodes' span (any time units)."""
    nodes = [float(t) for t in node_times]
    if len(nodes) < 1 or len(set(nodes)) != len(nodes):
        raise ValueError(f"gap_integral_weights needs distinct node times, got {nodes}")
    if len(gap_times) != len(gap_weights):
        raise ValueError(f"got {len(gap_times)} gap times for {len(gap_weights)} weights")
    origin, span = nodes[-1], max(abs(t - nodes[-1]) for t in nodes) or 1.0
    x = [(t - origin) / span for t in nodes]
    out = [0.0] * len(x)
    for t, g in zip(gap_times, gap_weights):
        u = (float(t) - origin) / span
        for j, xj in enumerate(x):
            basis = 1.0
            for i, xi in enumerate(x):
                if i != j:
                    basis *= (u - xi) / (xj - xi)
            out[j] += float(g) * basis
    return out


def gap_miss(stepped: Tensor, nodes: Sequence[Tensor], weights: Sequence[float], scale: float) -> Tensor:
    """``scale · (stepped − Σ_j W_j nodes_j)`` in float32, in the shape of the newest node: how far a gap's steps
    stepped from what the interpolant of the computed residuals says they should have. ``stepped``: ``Σ_k g_k R̂_k``
    over the gap's predictions; ``weights``: :func:`gap_integral_weights` for ``nodes`` (oldest first, the computed
    residual that ends the gap last). A later step of length h cancels it to first order by stepping with
    ``R − miss / h``."""
    shape = nodes[-1].shape
    return stepped.float().reshape(shape).sub(weighted_sum(nodes, weights)).mul_(float(scale))


def weighted_sum(nodes: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``Σ_j W_j nodes_j`` in float32, in the shape of the newest node: with the weights of
    :func:`gap_integral_weights` for one time and weight 1, the interpolant of the nodes at that time."""
    shape = nodes[-1].shape
    out = torch.zeros(shape, dtype=torch.float32, device=nodes[-1].device)
    for w, node in zip(weights, nodes):
        out.add_(node.float().reshape(shape), alpha=float(w))
    return out

def _require_finite_history(residuals: Sequence[Tensor]) -> None:
    if torch.compiler.is_compiling():  # traced: no data-dependent branch (the runtime checks its history itself)
        return
    for k, r in enumerate(residuals):
        if r.is_floating_point() and not all_finite(r):
            raise ValueError(
                f"history residual {k} (of {len(residuals)}, oldest first) has NaN or infinite values: an "
                "extrapolation from it would be meaningless; drop that point (the runtime never stores one)"
            )


def _saturate(pred: Tensor) -> Tensor:
    """The public functions' promise: finite inputs give finite outputs (clamped to the dtype's range)."""
    if pred.is_floating_point():
        fmax = min(torch.finfo(pred.dtype).max, torch.finfo(torch.float32).max)  # computed in float32
        pred = pred.clamp(-fmax, fmax)
    return torch.nan_to_num(pred, nan=0.0)


def _resolve(method: str, order: int, available: int) -> tuple[str, int]:
    """Method and order actually used. With two points and ``order >= 1`` Padé would be [0/1], about as poor as reuse
    on NUMERIC_STUDY's fixed schedules: Taylor-1 on the same two nodes is used instead. (The runtime asks for the
    controller's effective order, 0, on two points and so does get [0/1]: on the trained models' first prediction
    after a two-step warm-up it beat Taylor-1 by 4.7 dB; see ``TCPadeRuntime._run``.)"""
    l_eff = effective_order(method, order, available)
    if method == "pade" and available == 2 and order >= 1:
        return "taylor", 1
    return method, l_eff


def all_finite(x: Tensor) -> bool:
    """Whether every element is finite: ``x·0`` sums to NaN exactly when one is not (5x cheaper than
    ``isfinite(x).all()`` on CPU)."""
    return bool(torch.isfinite((x * 0).sum()))


def replace_nonfinite_(prediction: Tensor, fallback: Tensor, *, per_sample: bool = True) -> Tensor:
    """Where a batch row of ``prediction`` (the whole tensor unless ``per_sample``) has a NaN or infinite element,
    overwrite that row with ``fallback``'s (in place: the storage stays put); returns how many rows were replaced
    (a 1-element float32 tensor on the device: nothing is read to the host). The runtime's fallback is the newest
    computed residual, which is always finite: so a prediction is never stepped with a non-finite residual, without
    a per-step read of its finiteness."""
    rows = prediction.shape[0] if per_sample and prediction.dim() > 1 else 1
    flat = prediction.reshape(rows, -1)
    bad = ~torch.isfinite((flat * 0).sum(dim=1, keepdim=True))
    replaced = fallback.reshape(rows, -1).to(prediction.dtype)
    if flat.data_ptr() == prediction.data_ptr() and prediction.is_contiguous():
        torch.where(bad, replaced, flat, out=flat)
    else:
        prediction.copy_(torch.where(bad, replaced, flat).reshape(prediction.shape))
    return bad.sum(dtype=torch.float32).reshape(1)


def nonfinite_partial(x: Tensor) -> Tensor:
    """1.0 where ``x`` has a NaN or infinite element, else 0.0 (a 1-element tensor; combine with ``"sum"``: the
    number of processes whose share is not finite)."""
    return (~torch.isfinite((x * 0).sum())).float().reshape(1)


def relative_error_partials(actual: Tensor, predicted: Tensor, *, per_sample: bool = True) -> Tensor:
    """This process's share of :func:`relative_error`: (B, 3) ``[scale, ‖a − p‖, ‖a‖]``, norms of the data divided
    by ``scale`` (its largest magnitude); combine with ``"norm"`` (:class:`StatPack`)."""
    a, p = _flatten(actual, per_sample), _flatten(predicted, per_sample)
    scale = torch.clamp(a.abs().amax(dim=1, keepdim=True), min=_TINY)
    a, p = a / scale, p / scale
    return torch.stack([scale[:, 0], torch.linalg.vector_norm(a - p, dim=1), torch.linalg.vector_norm(a, dim=1)], 1)


def relative_error_from(partials: Tensor, *, eps: float = 1e-12) -> Tensor:
    """:func:`relative_error` from (combined) :func:`relative_error_partials`."""
    return partials[:, 1] / (partials[:, 2] + eps)


def relative_error(actual: Tensor, predicted: Tensor, *, per_sample: bool = True, eps: float = 1e-12) -> Tensor:
    """‖actual − predicted‖ / (‖actual‖ + eps), per sample (shape (B,)) or for the whole tensor (shape (1,))."""
    return relative_error_from(relative_error_partials(actual, predicted, per_sample=per_sample), eps=eps)


def modulation_partials(actual: Tensor, pade: Tensor, taylor: Tensor, *, per_sample: bool = True
                        ) -> tuple[Tensor, int]:
    """This process's share of :func:`fit_modulation`: ``(partials, count)``, ``partials`` (B, 3) ``[scale,
    ‖P − T‖², ⟨A − T, P − T⟩]`` in units of ``scale²`` (combine with ``"scaled"``), ``count`` the elements per
    batch row (``"sum"``)."""
    a, p, t = (_flatten(x, per_sample) for x in (actual, pade, taylor))
    scale = torch.clamp(torch.maximum(a.abs().amax(dim=1), p.abs().amax(dim=1)), min=_TINY)[:, None]
    diff = (p - t) / scale
    energy = torch.linalg.vecdot(diff, diff, dim=1)
    dot = torch.linalg.vecdot((a - t) / scale, diff, dim=1)
    return torch.stack([scale[:, 0], energy, dot], 1), int(diff.shape[1])


def modulation_from(partials: Tensor, count: int | Tensor, *, default: float | Tensor = 1.0) -> Tensor:
    """:func:`fit_modulation` from (combined) :func:`modulation_partials`."""
    energy, dot = partials[:, 1], partials[:, 2]
    mu = dot / torch.clamp(energy, min=_TINY)
    noise = count * (_ROUNDING_ULPS * torch.finfo(torch.float32).eps) ** 2
    fallback = (default.to(device=mu.device, dtype=torch.float32).expand_as(mu) if isinstance(default, Tensor)
                else torch.full_like(mu, float(default)))
    return torch.where((energy > noise) & torch.isfinite(mu), mu.clamp(0.0, 1.0), fallback)


def fit_modulation(
    actual: Tensor, pade: Tensor, taylor: Tensor, *, per_sample: bool = True, default: float | Tensor = 1.0
) -> Tensor:
    """The modulation μ ∈ [0, 1] that would have predicted ``actual`` best as ``taylor + μ·(pade − taylor)``
    (least squares; shape (B,) or (1,)). Where the two extrapolants agree to float32 rounding (e.g. b = 0) μ is
    not identifiable and ``default`` (a scalar or one per batch element) is returned."""
    partials, count = modulation_partials(actual, pade, taylor, per_sample=per_sample)
    return modulation_from(partials, count, default=default)


# -- statistics over several processes ----------------------------------------------------------------------------
class StatReducer:
    """How one process's share of the statistics becomes the global statistics. This base class is a single process
    (no communication: every statistic is already global); :class:`tcpade_fx.distributed.GroupReducer` gathers
    over a ``torch.distributed`` group (context parallelism: each process holds some of the tokens)."""

    world_size: int = 1

    def gather(self, packed: Tensor) -> Tensor:
        """Every process's ``packed`` (1-D, float64, the same length everywhere), stacked in rank order: shape
        ``(world_size, n)``, identical on every process."""
        return packed.unsqueeze(0)

    def combine(self, kind: str, shares: Tensor) -> Tensor:
        """The global value of a statistic of ``kind`` from every process's share (dim 0, in rank order)."""
        return combine_shares(kind, shares)


#: The single-process reducer.
LOCAL = StatReducer()

#: How the shares of a statistic combine (see :class:`StatPack`).
KINDS = ("sum", "max", "min", "scaled", "norm")


class StatPack:
    """Statistics packed for one collective: ``add`` each process's share with how it combines, ``reduce`` once.

    Kinds: ``"sum"`` (counts, dot products of unnormalised data), ``"max"``, ``"min"``; ``"scaled"``: column 0 of the
    last axis is a scale ``s`` and the other columns sums of squares or dot products of data divided by ``s``
    (the processes' shares are brought to the largest scale ``S``: ``Σ_r (s_r/S)²·v_r``); ``"norm"``: the same for
    norms (``sqrt(Σ_r (s_r/S·n_r)²)``). The combination is computed in float64 in rank order on every process, so
    every process gets the same values bit for bit; with one process each combines to its input exactly.
    """

    def __init__(self) -> None:
        self._parts: list[tuple[str, Tensor]] = []

    def add(self, kind: str, value: Tensor | float) -> int:
        """Add one share; returns its index in :meth:`reduce`'s result."""
        if kind not in KINDS:
            raise ValueError(f"unknown statistic kind {kind!r}; one of {KINDS}")
        self._parts.append((kind, torch.as_tensor(value)))
        return len(self._parts) - 1

    def reduce(self, reducer: StatReducer = LOCAL) -> list[Tensor]:
        """The global statistics, each in its share's shape and dtype, in the order they were added (one
        ``reducer.gather``; none for an empty pack)."""
        if not self._parts:
            return []
        if reducer.world_size == 1:  # every share is already global: no copy, no communication
            return [v for _, v in self._parts]
        device = next((v.device for _, v in self._parts if v.device.type != "cpu"), torch.device("cpu"))
        flat = torch.cat([v.detach().reshape(-1).to(device=device, dtype=torch.float64) for _, v in self._parts])
        rows = reducer.gather(flat)
        out, at = [], 0
        for kind, v in self._parts:
            n = v.numel()
            share = rows[:, at:at + n].reshape(rows.shape[0], *v.shape)
            at += n
            out.append(reducer.combine(kind, share).to(device=v.device, dtype=v.dtype))
        return out


def combine_shares(kind: str, shares: Tensor) -> Tensor:
    """Combine the shares (dim 0: the processes, in rank order) of a statistic of ``kind`` (see :class:`StatPack`)."""
    if shares.shape[0] == 1:
        return shares[0]  # one process: its own value (every combination below is the identity on one share)
    if kind == "sum":
        return shares.sum(dim=0)
    if kind == "max":
        return shares.amax(dim=0)
    if kind == "min":
        return shares.amin(dim=0)
    scales, values = shares[..., :1], shares[..., 1:]
    top = scales.amax(dim=0)
    ratio = torch.where(top > 0, scales / torch.where(top > 0, top, torch.ones_like(top)), torch.zeros_like(scales))
    if kind == "scaled":
        combined = (ratio * ratio * values).sum(dim=0)
    else:  # norm
        combined = torch.sqrt(((ratio * values) ** 2).sum(dim=0))
    return torch.cat([top, combined], dim=-1)
