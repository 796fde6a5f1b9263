"""``tcpade-fx demo`` (the README's main job) on the bundled mnist-dit: the table, the files, and that TC-Padé
predicted steps and stayed close to the full run (the same images the full pipeline makes, seeds 0..1)."""

import json

import pytest
import torch
from PIL import Image

from tcpade_fx import cli


def test_image_demo_on_two_seeds(tmp_path, capsys):
    torch.manual_seed(0)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--seeds", "2", "--steps", "10", "--repeats", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for field in ("block-stack steps computed", "schedule", "wall clock full / TC-Padé", "measured speedup",
                  "PSNR vs full", "SSIM vs full"):
        assert field in printed, field

    result = json.loads((out / "result.json").read_text())
    assert result["model"] == "mnist-dit" and result["seeds"] == 2 and result["steps"] == 10
    assert result["policy"] == "balanced" and len(result["schedule"]) == 10
    assert 0 < result["computed_steps"] < 10 and "." in result["schedule"]  # predicted steps: caching engaged
    assert result["ideal_speedup"] == pytest.approx(1 / result["compute_fraction"])
    assert result["median_seconds_full"] > 0 and result["median_seconds_tcpade"] > 0
    assert result["psnr_db"] > 25 and 0.8 < result["ssim"] <= 1
    for name in ("grid.png", "steps.png"):
        image = Image.open(out / name)
        assert image.size[0] > 0 and image.size[1] > 0
