"""tcpade-fx: TC-Padé residual caching for diffusion transformers, as a graph transformation.

    pipe = tcpade_fx.compile(pipe, policy="balanced")   # eager, "inductor", or "tensorrt"
    image = pipe(...).images[0]
    print(pipe.tcpade.stats)

    choice = tcpade_fx.calibrate(pipe, {"prompt": prompts, "num_inference_steps": 28})  # what to forecast, measured
    pipe = tcpade_fx.compile(pipe, policy=choice.policy)
"""

from .api import compile, disable
from .calibrate import Calibration, calibrate
from .controller import Decision, StepController
from .pade import extrapolate, fit_denominator, relative_error
from .policy import PRESET_AIMS, PRESETS, Policy

__version__ = "0.1.0"

__all__ = [
    "Calibration",
    "Decision",
    "calibrate",
    "compile",
    "disable",
    "PRESETS",
    "PRESET_AIMS",
    "Policy",
    "StepController",
    "__version__",
    "extrapolate",
    "fit_denominator",
    "relative_error",
]
