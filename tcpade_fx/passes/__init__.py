"""Graph passes of tcpade_fx, one module per stage, driven by :func:`build_graphs` (:mod:`.pipeline`):

    capture ─▶ (dynamic) ─▶ locate ─▶ rewrite ─▶ verify        split: head/body/tail pieces, checked bit for bit
                                   └──▶ units (granularity="modules": forecast every block's attention/FFN outputs)

Each pass is a function on GraphModules (or on a call, for the captures); none holds state.
"""

from .capture import (TIME_ARGUMENTS, CaptureError, CapturedGraph, bind_call, capture_graph, flatten_call, leaf_names,
                      strip_assertions, time_argument)
from .dynamic import BATCH, ShapePlan, capture_dynamic
from .locate import BlockStackPlan, UnsupportedModelError, locate_block_stack
from .pipeline import Graphs, build_graphs, example_residual
from .rewrite import RESIDUAL_INPUT, build_compute_graph, build_predict_graph
from .split import split_head_body_tail
from .units import (GRANULARITIES, UNITS_INPUT, UnitPlan, build_units_compute_graph, build_units_predict_graph,
                    locate_forecast_units)
from .verify import Verification, VerificationError, check_rewrite, verify_rewrite, verify_split

__all__ = [
    "BATCH",
    "GRANULARITIES",
    "UNITS_INPUT",
    "UnitPlan",
    "build_units_compute_graph",
    "build_units_predict_graph",
    "locate_forecast_units",
    "BlockStackPlan",
    "CaptureError",
    "CapturedGraph",
    "Graphs",
    "RESIDUAL_INPUT",
    "ShapePlan",
    "UnsupportedModelError",
    "Verification",
    "VerificationError",
    "bind_call",
    "build_compute_graph",
    "build_graphs",
    "build_predict_graph",
    "TIME_ARGUMENTS",
    "capture_dynamic",
    "capture_graph",
    "time_argument",
    "check_rewrite",
    "example_residual",
    "flatten_call",
    "leaf_names",
    "locate_block_stack",
    "split_head_body_tail",
    "strip_assertions",
    "verify_rewrite",
    "verify_split",
]
