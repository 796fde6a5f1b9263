"""``tcpade-fx demo --model mnist-wan``: full vs TC-Padé clips, the table, demo.gif, strip.png and result.json."""

import json

import pytest
import torch
from PIL import Image

from tcpade_fx import cli, models
from tcpade_fx.models import wan

pytestmark = pytest.mark.skipif("mnist-wan" not in models.available(), reason="mnist-wan weights not bundled")


def test_demo_on_two_clips(tmp_path, capsys):
    torch.manual_seed(0)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--model", "mnist-wan", "--seeds", "2", "--steps", "8", "--repeats", "1",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for field in ("block-stack calls computed", "schedule", "wall clock full / TC-Padé", "measured speedup", "ideal",
                  "PSNR vs full", "SSIM vs full", "per-frame accuracy full / TC-Padé"):
        assert field in printed, field

    result = json.loads((out / "result.json").read_text())
    assert result["model"] == "mnist-wan" and result["clips"] == 2 and result["steps"] == 8
    assert result["guidance"] == wan.DEFAULT_GUIDANCE  # the pipeline's default, not the image demo's 1.5
    assert result["frames_per_clip"] == wan.NUM_FRAMES
    assert result["transformer_calls"] == 2 * 8  # cond + uncond per step
    # at 8 steps the presets compute every step (warm-up and final stage); the default 20 steps skip
    assert 0 < result["compute_fraction"] <= 1
    assert result["ideal_speedup"] == pytest.approx(1 / result["compute_fraction"])
    assert len(result["schedule"]) == 8 and set(result["schedule"]) <= {"C", "."}
    assert result["speedup"] > 0 and result["psnr_db"] > 10 and 0 < result["ssim"] <= 1
    for key in ("per_frame_accuracy_full", "per_frame_accuracy_tcpade"):
        assert 0 <= result[key] <= 1

    gif = Image.open(out / "demo.gif")
    assert gif.n_frames == wan.NUM_FRAMES and gif.is_animated
    strip = Image.open(out / "strip.png")
    assert strip.size[0] > strip.size[1] > 0


def test_image_demo_keeps_its_defaults():
    from tcpade_fx.demo_video import resolve_demo_defaults

    args = cli.argparse.Namespace(model="mnist-dit", steps=None, seeds=None, guidance=None)
    assert vars(resolve_demo_defaults(args)) == {"model": "mnist-dit", "steps": 28, "seeds": 16, "guidance": 1.5}
    args = cli.argparse.Namespace(model="mnist-wan", steps=12, seeds=None, guidance=None)
    assert vars(resolve_demo_defaults(args)) == {"model": "mnist-wan", "steps": 12, "seeds": 4,
                                                 "guidance": wan.DEFAULT_GUIDANCE}
