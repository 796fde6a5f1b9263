"""tcpade_fx over ``torch.distributed``: which processes share a transformer's statistics, and the reducer that
gathers them.

With diffusers' context parallelism (``transformer.enable_parallelism(config=ContextParallelConfig(...))``, Ulysses
and Ring attention) every process of the context-parallel mesh runs the same denoising step on its own chunk of the
tokens: the block stack's residual is split across them. A compute-or-predict decision taken from one process's
chunk alone would differ between processes (one enters the compute graph's all-to-alls while another enters the
predict graph's all-gather, and the job deadlocks), so every statistic that feeds a decision or a prediction is
reduced over the mesh (:class:`GroupReducer`, :class:`tcpade_fx.pade.StatPack`) and the decision is checked equal
on every process before any graph runs (:class:`DivergedDecisionError` otherwise, never a hang).

:func:`parallel_context` reads the setup off the transformer (diffusers records it as ``_parallel_config`` when
``enable_parallelism`` runs, before or after :func:`tcpade_fx.compile`); ``process_group=`` of
:func:`tcpade_fx.compile` names the group for a custom setup. Data parallelism (one request per process) needs
none of this: each process has its own runtime and its own decisions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .pade import StatReducer

Tensor = torch.Tensor


class DivergedDecisionError(RuntimeError):
    """The processes of a context-parallel group reached different compute-or-predict decisions (or capture
    verdicts); running on would deadlock in mismatched collectives."""


class UnsupportedParallelismError(RuntimeError):
    """A parallel setup tcpade_fx does not support (the message says what to do)."""


@dataclass
class CollectiveCost:
    """What the reducer's collectives cost: calls, bytes each process sent, seconds (wall, host-side) spent in
    them."""

    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"calls": self.calls, "bytes": self.bytes, "seconds": self.seconds}


class GroupReducer(StatReducer):
    """Gathers the packed statistics of every process of ``group`` with one ``all_gather_into_tensor`` (a few
    hundred bytes per step); each process then combines them in rank order, so all get the same values."""

    def __init__(self, group=None):
        import torch.distributed as dist

        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.cost = CollectiveCost()

    def gather(self, packed: Tensor) -> Tensor:
        import torch.distributed as dist

        start = time.perf_counter()
        packed = packed.contiguous()
        rows = packed.new_empty(self.world_size * packed.numel())  # gloo takes the flat (concatenated) form
        dist.all_gather_into_tensor(rows, packed, group=self.group)
        rows = rows.view(self.world_size, packed.numel())
        self.cost.calls += 1
        self.cost.bytes += packed.numel() * packed.element_size()
        self.cost.seconds += time.perf_counter() - start
        return rows


@dataclass
class ParallelContext:
    """The processes a transformer's statistics are reduced over."""

    reducer: GroupReducer
    description: str  # "context parallel (ulysses 2 x ring 1)", "process group of 2"
    key: tuple = field(default=())  # identifies the setup in input signatures (graphs are captured per setup)

    @property
    def world_size(self) -> int:
        return self.reducer.world_size

    @property
    def rank(self) -> int:
        return self.reducer.rank


def context_parallel_config(module: torch.nn.Module):
    """The ``ContextParallelConfig`` diffusers' ``enable_parallelism`` put on ``module`` (None without one).

    Raises :class:`UnsupportedParallelismError` for tensor parallelism (not supported by tcpade_fx)."""
    config = getattr(module, "_parallel_config", None)
    if config is None:
        return None
    if getattr(config, "tensor_parallel_config", None) is not None:
        raise UnsupportedParallelismError(
            f"{type(module).__name__} has tensor parallelism enabled (enable_parallelism with a TensorParallelConfig): "
            "tcpade_fx supports context parallelism (ContextParallelConfig: Ulysses, Ring) and data parallelism (one "
            "request per process) but has not been validated with tensor-parallel weights (DTensor). Use "
            "context parallelism, or tcpade_fx.disable(pipe) for this setup."
        )
    return getattr(config, "context_parallel_config", None)


_REDUCERS: dict = {}


def reducer_for(group) -> GroupReducer:
    """The reducer of ``group``, made once per group (tests replace this function to run with other statistics)."""
    reducer = _REDUCERS.get(group)
    if reducer is None:
        reducer = _REDUCERS[group] = GroupReducer(group)
    return reducer


def parallel_context(module: torch.nn.Module, process_group=None) -> ParallelContext | None:
    """The processes ``module``'s statistics are reduced over: ``process_group`` when given, else the
    context-parallel mesh of diffusers' ``enable_parallelism``; None for a single process (or a group of one).

    Raises :class:`UnsupportedParallelismError` for tensor parallelism."""
    cp = context_parallel_config(module)
    if process_group is None and cp is None:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if process_group is None:
            return None
        raise UnsupportedParallelismError("process_group= was given but torch.distributed is not initialized: call "
                                          "torch.distributed.init_process_group first")
    if process_group is not None:
        group, description = process_group, f"process group of {dist.get_world_size(process_group)}"
    else:
        mesh = cp._flattened_mesh
        if mesh is None:
            return None
        group = mesh.get_group()
        description = f"context parallel (ulysses {cp.ulysses_degree} x ring {cp.ring_degree})"
    reducer = reducer_for(group)
    if reducer.world_size == 1:
        return None
    return ParallelContext(reducer, description, key=("parallel", description, reducer.rank, reducer.world_size))

