"""Shared test setup: one torch thread (the machine is shared with training jobs) and a hypothesis profile."""

import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(1)

settings.register_profile(
    "tcpade", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile("tcpade")
