"""A graph of the call leaves as a module of its tensor leaves only, for clean exports and compilers."""

from __future__ import annotations

import torch


class TensorOnly(torch.nn.Module):
    """``graph(*leaves)`` as a module of the tensor leaves only (constants are baked in)."""

    def __init__(self, graph: torch.fx.GraphModule, leaves: list, tensor_positions: list[int], extra: int = 0):
        super().__init__()
        self.inner = graph
        self.constants = [None if i in tensor_positions else x for i, x in enumerate(leaves)]
        self.tensor_positions = list(tensor_positions)
        self.extra = extra  # trailing tensor inputs beyond the call leaves (predict: the residual)

    def forward(self, *tensors):
        full = list(self.constants)
        for pos, t in zip(self.tensor_positions, tensors):
            full[pos] = t
        full += list(tensors[len(self.tensor_positions):])
        return tuple(self.inner(*full))
