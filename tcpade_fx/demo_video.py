"""``tcpade-fx demo --model mnist-wan``: the same seeds sampled as clips with the full pipeline and with TC-Padé.

    tcpade-fx demo --model mnist-wan                      # 4 clips, 20 steps, policy balanced
    tcpade-fx demo --model mnist-wan --seeds 10 --steps 28 --policy fast --out out/demo-wan

Writes ``demo.gif`` (animated: full run, TC-Padé and their difference ×4, one column per clip), ``strip.png`` (every
frame of every clip, full above TC-Padé) and ``result.json``, and prints the image demo's table (computed steps,
schedule, wall clock, measured and ideal speedup, PSNR / SSIM vs full over all frames) with the per-frame class
accuracy of both runs (bundled classifier after ``wan.mnist_normalise``, as examples/eval_wan.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

#: per-model defaults of the demo options left unset on the command line (the image models' are the old defaults);
#: mnist-wan's clip count and steps keep the demo under two minutes on 2 busy CPU cores
DEMO_DEFAULTS = {
    "image": {"steps": 28, "seeds": 16, "guidance": 1.5},
    "mnist-wan": {"steps": 20, "seeds": 4, "guidance": None},  # None: the pipeline's wan.DEFAULT_GUIDANCE
}


def resolve_demo_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the demo options that are None with the model's defaults (:data:`DEMO_DEFAULTS`)."""
    defaults = DEMO_DEFAULTS.get(args.model, DEMO_DEFAULTS["image"])
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            if name == "guidance" and value is None:
                from .models import wan

                value = wan.DEFAULT_GUIDANCE
            setattr(args, name, value)
    return args


def demo_inputs(args: argparse.Namespace, latent_shape: tuple = (1, 28, 28)):
    """What both demos start from: (console, output folder, labels, latents, call keywords); sets the threads."""
    from rich.console import Console

    from tcpade_fx import metrics

    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seeds))
    call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="pt")
    return Console(), out_dir, [s % 10 for s in seeds], metrics.seeded_latents(seeds, latent_shape), call


def frame_accuracy(clips: torch.Tensor, labels: list[int]) -> float:
    """Share of the frames of ``clips`` (B, F, 1, 28, 28) that the bundled classifier reads as the clip's label."""
    from .models import wan
    from .models.classifier import load_classifier

    b, f = clips.shape[:2]
    with torch.no_grad():
        pred = load_classifier()(wan.mnist_normalise(clips.reshape(b * f, 1, *clips.shape[-2:]))).argmax(1)
    return (pred.view(b, f) == torch.tensor(labels)[:, None]).float().mean().item()


def interleaved_medians(runs: dict, repeats: int, advance=None) -> tuple[dict, dict]:
    """Run each callable once untimed (warm-up: capture, verification), then ``repeats`` timed rounds of all of them
    in turn; returns (median seconds, last output) per name. ``advance()``, when given, is called after each run
    (``len(runs) * (repeats + 1)`` times: a progress bar)."""
    outputs = {}
    for name, fn in runs.items():
        outputs[name] = fn()
        if advance is not None:
            advance()
    seconds: dict = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            outputs[name] = fn()
            seconds[name].append(time.perf_counter() - start)
            if advance is not None:
                advance()
    return {name: statistics.median(t) for name, t in seconds.items()}, outputs


def _to_uint8(frames: torch.Tensor) -> np.ndarray:
    return (((frames.float().clamp(-1, 1) + 1) / 2) * 255).round().to(torch.uint8).cpu().numpy()


def save_gif(reference: torch.Tensor, clips: torch.Tensor, path: Path, scale: int = 4, ms_per_frame: int = 200) -> None:
    """Animated GIF: rows full / TC-Padé / |diff| ×4, one column per clip (clips (B, F, 1, H, W) in [-1, 1])."""
    from PIL import Image

    diff = ((clips - reference).abs() * 4 - 1).clamp(-1, 1)
    rows = [_to_uint8(x) for x in (reference, clips, diff)]  # each (B, F, 1, H, W)
    b, f, _, h, w = reference.shape
    pad = 2
    pictures = []
    for j in range(f):
        canvas = np.full((3 * (h + pad) + pad, b * (w + pad) + pad), 64, dtype=np.uint8)
        for r, row in enumerate(rows):
            for i in range(b):
                y, x = pad + r * (h + pad), pad + i * (w + pad)
                canvas[y:y + h, x:x + w] = row[i, j, 0]
        pictures.append(Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale),
                                                       Image.NEAREST))
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=ms_per_frame, loop=0)


def save_strip(reference: torch.Tensor, clips: torch.Tensor, labels: list[int], path: Path, title: str) -> None:
    """Frame strip: for each clip a row of its full-run frames above a row of its TC-Padé frames."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b, f = reference.shape[:2]
    fig, axes = plt.subplots(2 * b, f, figsize=(0.8 * f + 0.6, 0.8 * 2 * b + 0.5), squeeze=False)
    for i in range(b):
        for k, (name, batch) in enumerate((("full", reference), ("TC-Padé", clips))):
            for j in range(f):
                ax = axes[2 * i + k][j]
                ax.imshow(_to_uint8(batch[i, j, 0]), cmap="gray", vmin=0, vmax=255)
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel(f"{labels[i]}: {name}", fontsize=6, rotation=0, ha="right", va="center")
                if i == 0 and k == 0:
                    ax.set_title(f"frame {j}", fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_video_demo(args: argparse.Namespace) -> dict:
    """Full vs TC-Padé on ``mnist-wan``: the table, demo.gif, strip.png and result.json in ``args.out``."""
    from rich.table import Table

    import tcpade_fx
    from tcpade_fx import metrics, models
    from tcpade_fx.models import wan

    args = resolve_demo_defaults(args)
    console, out_dir, labels, latents, call = demo_inputs(args, (1, wan.NUM_FRAMES, 28, 28))

    with console.status(f"loading {args.model}"):
        full = models.load(args.model)
        # one input shape for the whole demo: a static capture is enough, and cheaper (2 clips, 8 steps: 29 s
        # wall for the whole command vs 42-58 s with symbolic axes, on 2 busy cores)
        accelerated = tcpade_fx.compile(models.load(args.model), policy=args.policy, backend=args.backend,
                                        dynamic_shapes=False)
    with console.status(f"sampling {args.seeds} clips, full and TC-Padé interleaved ({args.repeats} timed repeats)"):
        medians, outputs = interleaved_medians({
            "full": lambda: full(labels, latents=latents, **call).frames,
            "tcpade": lambda: accelerated(labels, latents=latents, **call).frames,
        }, args.repeats)
    reference, clips = outputs["full"], outputs["tcpade"]
    frames = lambda x: x.reshape(-1, 1, *x.shape[-2:])  # noqa: E731

    stats = accelerated.tcpade.stats
    result = {
        "model": args.model, "policy": args.policy, "backend": args.backend, "steps": args.steps,
        "clips": args.seeds, "frames_per_clip": int(reference.shape[1]), "guidance": args.guidance,
        "threads": args.threads, "computed_steps": stats.computed, "transformer_calls": len(stats.records),
        "compute_fraction": stats.compute_fraction, "ideal_speedup": 1 / stats.compute_fraction,
        "median_seconds_full": medians["full"], "median_seconds_tcpade": medians["tcpade"],
        "speedup": medians["full"] / medians["tcpade"],
        "psnr_db": metrics.psnr(reference, clips), "ssim": metrics.ssim(frames(reference), frames(clips)),
        "per_frame_accuracy_full": frame_accuracy(reference, labels),
        "per_frame_accuracy_tcpade": frame_accuracy(clips, labels),
        "schedule": stats.decisions(),
    }
    title = f"{args.model}, {args.steps} steps, guidance {args.guidance:g}, policy {args.policy}"
    save_gif(reference, clips, out_dir / "demo.gif")
    save_strip(reference, clips, labels, out_dir / "strip.png", title)
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))

    table = Table(title=f"TC-Padé demo: {args.model}, policy {args.policy!r}, {args.steps} steps, {args.seeds} clips "
                        f"of {result['frames_per_clip']} frames")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("block-stack calls computed", f"{stats.computed}/{len(stats.records)} "
                                                f"({100 * stats.compute_fraction:.0f} %; cond + uncond per step)")
    table.add_row("schedule (C computed, . predicted)", stats.decisions())
    table.add_row("wall clock full / TC-Padé (median)", f"{medians['full']:.2f} s / {medians['tcpade']:.2f} s")
    table.add_row("measured speedup", f"{result['speedup']:.2f}x (ideal {result['ideal_speedup']:.2f}x)")
    table.add_row("PSNR vs full (all frames)", f"{result['psnr_db']:.2f} dB")
    table.add_row("SSIM vs full (mean over frames)", f"{result['ssim']:.4f}")
    table.add_row("per-frame accuracy full / TC-Padé",
                  f"{result['per_frame_accuracy_full']:.3f} / {result['per_frame_accuracy_tcpade']:.3f}")
    console.print(table)
    console.print(f"wrote {out_dir / 'demo.gif'}, {out_dir / 'strip.png'}, {out_dir / 'result.json'}")
    return result
