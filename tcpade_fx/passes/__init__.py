"""Graph passes of tcpade_fx: capture → locate → split → verify → rewrite (GraphModule → GraphModule)."""

from .capture import CapturedGraph, capture_graph, flatten_call, strip_assertions
from .locate import BlockStackPlan, UnsupportedModelError, locate_block_stack
from .rewrite import RESIDUAL_INPUT, build_compute_graph, build_predict_graph
from .split import split_head_body_tail
from .verify import VerificationError, rewrite_and_verify, verify_rewrite, verify_split

__all__ = [
    "BlockStackPlan",
    "CapturedGraph",
    "RESIDUAL_INPUT",
    "UnsupportedModelError",
    "VerificationError",
    "build_compute_graph",
    "build_predict_graph",
    "capture_graph",
    "flatten_call",
    "locate_block_stack",
    "rewrite_and_verify",
    "split_head_body_tail",
    "strip_assertions",
    "verify_rewrite",
    "verify_split",
]
