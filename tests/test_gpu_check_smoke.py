"""bench/gpu_check.sh --smoke: the GPU check's own script, run on the CPU at tiny sizes (issue 15 part 5)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_every_geometry_and_reports(tmp_path):
    report, rows_file = tmp_path / "GPU.md", tmp_path / "rows.jsonl"
    env_python = str(Path(sys.executable).parent)
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--smoke", "--backends", "eager", "modules", "cuda-graphs", "tensorrt",
         "--out", str(report), "--jsonl", str(rows_file)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={"PATH": f"{env_python}:/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = report.read_text()
    assert "CPU SMOKE RUN" in text
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    by = {(r["geometry"], r["config"]): r for r in rows}
    for geometry in ("flux-dev", "wan2.1-1.3b"):
        full = by[(geometry, "full eager")]
        assert full["status"] == "ok" and full["computed"] == full["steps"] == 10
        assert full["syncs_per_step"] == 0  # the untouched transformer reads nothing back
        for policy, budget in (("balanced", 4), ("fast", 3)):  # ceil(0.40 * 10), ceil(0.28 * 10)
            row = by[(geometry, f"tcpade eager {policy}")]
            assert row["status"] == "ok", row
            assert 1 <= row["computed"] <= budget and len(row["extra"]["schedule"]) == 10
            assert 0 < row["rel_error"] < 0.5 and row["seconds"] > 0
            assert row["syncs_per_step"] is not None and set(row["syncs_by_kind"]) == {"computed", "predicted"}
        modules = by[(geometry, "tcpade eager modules balanced")]
        assert modules["status"] == "ok", modules
        assert modules["computed"] == by[(geometry, "tcpade eager balanced")]["computed"]
        assert 0 < modules["rel_error"] < 0.5
        assert by[(geometry, "tcpade inductor cuda_graphs=True balanced")]["status"] == "not available"
        assert by[(geometry, "tcpade inductor mode=reduce-overhead balanced")]["status"] == "not available"
        trt = by[(geometry, "tcpade tensorrt")]
        assert trt["status"] in ("not available", "ok", "failed")
        assert f"| tcpade eager balanced | ok |" in text
