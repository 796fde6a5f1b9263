"""Helpers for running diffusers' context parallelism on CPU processes (gloo): the tests, the example, the benchmark.

diffusers 0.42 context parallelism runs on CPU with two workarounds for diffusers' own CPU gaps (not tcpade_fx's),
applied in the calling process by :func:`cpu_context_parallel_workarounds`:

* ``ModelMixin.enable_parallelism`` picks its device as ``rank % torch.accelerator.device_count()``, which is 0 on
  a machine without an accelerator (ZeroDivisionError): the count is reported as 1 in this process;
* Ring attention merges the partial attentions by their log-sum-exp, which diffusers' native CPU path does not
  return ("Native attention does not support return_lse=True"): it is taken from
  ``aten._scaled_dot_product_flash_attention_for_cpu``, which returns it.

On GPUs neither is needed (and :func:`cpu_context_parallel_workarounds` does nothing where an accelerator exists).
"""

from __future__ import annotations

import datetime
import os

import torch


def cpu_context_parallel_workarounds() -> bool:
    """Apply the two CPU workarounds above in this process (idempotent); False (nothing done) where an accelerator
    is present."""
    if torch.accelerator.device_count() > 0:
        return False
    torch.accelerator.device_count = lambda: 1  # type: ignore[assignment]
    from diffusers.models import attention_dispatch

    if getattr(attention_dispatch._native_attention_forward_op, "_tcpade_cpu_lse", False):
        return True
    original = attention_dispatch._native_attention_forward_op

    def forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
        if not return_lse or query.device.type != "cpu" or attn_mask is not None or enable_gqa:
            return original(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                            return_lse, _save_ctx=_save_ctx, _parallel_config=_parallel_config)
        if _save_ctx:
            ctx.save_for_backward(query, key, value)
            ctx.attn_mask, ctx.dropout_p, ctx.is_causal, ctx.scale, ctx.enable_gqa = (
                attn_mask, dropout_p, is_causal, scale, enable_gqa)
        q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
        return out.permute(0, 2, 1, 3), lse.permute(0, 2, 1)  # model layout (B, S, H, D) and (B, S, H)

    forward_op._tcpade_cpu_lse = True
    attention_dispatch._native_attention_forward_op = forward_op
    return True


def init_gloo(timeout_s: float = 60.0) -> tuple[int, int]:
    """``init_process_group("gloo")`` from torchrun's environment with a timeout (a deadlock then fails instead of
    hanging); returns (rank, world size)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def context_parallel_config(kind: str):
    """A ``ContextParallelConfig`` over all processes: ``"ulysses"``, ``"ring"`` or ``"both"`` (ring × ulysses,
    needs a world size of 4 or more that both degrees divide)."""
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    world = dist.get_world_size()
    if kind == "ulysses":
        return ContextParallelConfig(ulysses_degree=world)
    if kind == "ring":
        return ContextParallelConfig(ring_degree=world)
    if kind == "both":
        if world < 4 or world % 2:
            raise ValueError(f"ring x ulysses needs an even world size >= 4, got {world}")
        return ContextParallelConfig(ring_degree=2, ulysses_degree=world // 2)
    raise ValueError(f"unknown context-parallel kind {kind!r}: use 'ulysses', 'ring' or 'both'")


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))


def per_process_statistics_reducer(group=None):
    """A reducer that communicates like tcpade_fx's (the same collectives, the decision guard global) but keeps each
    process's own statistics, as a cache that reduces nothing would: for showing that such a cache's processes
    diverge, which the guard then reports (:class:`tcpade_fx.distributed.DivergedDecisionError`) instead of a hang."""
    from .distributed import GroupReducer
    from .pade import combine_shares

    class PerProcessStatistics(GroupReducer):
        def combine(self, kind, shares):
            if kind in ("min", "max"):  # the decision guard
                return combine_shares(kind, shares)
            return shares[self.rank]

    return PerProcessStatistics(group)
