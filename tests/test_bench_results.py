"""The benchmark's resumable results: rows keyed by (steps, label, samples, shift), and the peer rows' compute
targets read from the preset rows of the same shift (bench/benchmark.py, bench/peers.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import peers  # noqa: E402
from tcpade_fx import Policy  # noqa: E402


def test_peer_targets_follow_the_preset_rows_of_the_bench_shift():
    row = lambda compute, **extra: {"compute": compute, **extra}  # noqa: E731
    done = {
        (20, "TC-Padé quality", 16, 1.0): row(0.5),
        (20, "TC-Padé quality", 16, 3.0): row(0.55),
        (20, "TC-Padé balanced", 16, 3.0): row(0.35, fd_only=True),  # an --fd-only row does not set targets
        (28, "TC-Padé fast", 16, 3.0): row(0.2857),
    }
    targets = peers.preset_targets(SimpleNamespace(done=done, shift=3.0), 20)
    assert targets == (0.55, Policy.preset("balanced").compute_budget, Policy.preset("fast").compute_budget)
    assert peers.preset_targets(SimpleNamespace(done=done, shift=1.0), 20)[0] == 0.5
    assert peers.preset_targets(SimpleNamespace(done=done, shift=3.0), 28)[2] == 0.286
