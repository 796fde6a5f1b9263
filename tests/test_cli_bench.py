"""``tcpade-fx bench PIPELINE_DIR`` on a tiny pipeline saved to disk (offline), and its input errors."""

from __future__ import annotations

import json

import pytest
import torch

from tcpade_fx import cli
from tcpade_fx.integration import as_images
from tcpade_fx.testing_pipelines import tiny_dit_pipeline, tiny_flux_pipeline


@pytest.fixture(scope="module")
def saved_dit(tmp_path_factory):
    pipe, _ = tiny_dit_pipeline()
    folder = tmp_path_factory.mktemp("tiny-dit")
    pipe.save_pretrained(folder)
    return folder


def test_bench_on_a_saved_pipeline_reports_and_writes_the_grid(saved_dit, tmp_path, capsys):
    prompts = tmp_path / "labels.txt"
    prompts.write_text("# class ids, one per line\n0\n1\n\n1\n")
    out = tmp_path / "out"
    argv = ["bench", str(saved_dit), "--prompts", str(prompts), "--steps", "12", "--policy", "balanced",
            "--device", "cpu", "--dtype", "float32", "--threads", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    assert (out / "grid.png").stat().st_size > 1000
    assert result["pipeline_class"] == "DiTPipeline"
    assert result["conditions"] == [0, 1, 1] and result["seeds"] == [0, 1, 2]
    assert result["device"] == "cpu" and result["dtype"] == "float32"
    # DiT's batched CFG: one transformer call per step and image; "balanced" computes at most ceil(0.4 * 12) = 5
    assert len(result["schedule"]) == 12 and result["schedule"].count("C") <= 5
    assert result["ideal_speedup"] == pytest.approx(1 / result["compute_fraction"])
    assert result["ideal_speedup"] >= 12 / 5 - 1e-9
    assert result["speedup"] > 0 and result["seconds_full"] > 0 and result["seconds_tcpade"] > 0
    # random weights: only that the cached run stays near the full one, and that the metrics are real numbers
    assert 10 < result["psnr_db"] < float("inf") and 0 < result["ssim"] <= 1
    assert result["peak_memory_bytes_full"] > 0 and result["peak_memory_bytes_tcpade"] > 0
    assert "RSS" in result["peak_memory_measure"]
    printed = capsys.readouterr().out
    assert "measured speedup" in printed and "PSNR vs full" in printed


def test_bench_refuses_a_folder_that_is_not_a_pipeline(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", str(tmp_path), "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "no model_index.json" in capsys.readouterr().err


def test_text_pipelines_need_prompts_and_class_pipelines_need_ids():
    flux, _ = tiny_flux_pipeline()
    with pytest.raises(cli.BenchInputError, match="--prompts FILE"):
        cli.conditioning(flux, [])
    assert cli.conditioning(flux, ["a cat", "a dog"]) == ("prompt", ["a cat", "a dog"])
    dit, _ = tiny_dit_pipeline()
    dit.labels = {}  # saved DiT pipelines keep no id2label: names cannot be resolved
    assert cli.conditioning(dit, []) == ("class_labels", list(range(8)))
    assert cli.conditioning(dit, ["3", "7"]) == ("class_labels", [3, 7])


def test_video_frames_become_images():
    class Out:
        frames = torch.rand(2, 5, 8, 8, 3).numpy()

    images = as_images(Out())
    assert images.shape == (10, 3, 8, 8) and images.min() >= -1 and images.max() <= 1


def test_a_bundled_model_folder_loads_with_its_own_class():
    from tcpade_fx import models

    pipe = cli.load_pipeline(str(models.WEIGHTS_DIR / "mnist-dit"), "cpu", torch.float32)
    assert type(pipe).__name__ == "MNISTDiTPipeline"
    assert cli.conditioning(pipe, ["4"]) == ("class_labels", [4])


def test_bench_measures_the_module_forecast_when_asked(saved_dit, tmp_path):
    out = tmp_path / "out"
    argv = ["bench", str(saved_dit), "--steps", "12", "--granularity", "modules", "--limit", "2", "--device", "cpu",
            "--dtype", "float32", "--threads", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["granularity"] == "modules" and result["policy"] == "balanced"
    assert any("granularity 'modules'" in n for n in result["notes"]), result["notes"]
    assert result["schedule"].count(".") > 0 and 10 < result["psnr_db"] < float("inf")
