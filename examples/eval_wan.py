"""Quality of ``mnist-wan``: per-frame class accuracy and temporal consistency, next to real clips.

    python examples/eval_wan.py                                   # 100 clips, 28 steps, guidance 5 (the default)
    python examples/eval_wan.py --clips 200 --steps 20 --png bench/mnist_wan_samples.png

Per-frame accuracy: every frame of every clip classified by the bundled classifier after MNIST-style
re-normalisation (``wan.mnist_normalise``: the digit's box scaled to 20 px, centre of mass centred), because the
classifier was trained on centred full-size digits and reads the shrunk, moving ones poorly as they are (the raw
number is printed too). Temporal consistency, on each clip's per-frame centre-of-mass track:

* ``track_rms_px``: RMS distance (pixels) to the best constant-velocity-with-bounce track (``wan.track_residual``);
  printed for the generated clips, real clips, and the generated clips with their frames shuffled in time (what a
  model with no temporal coherence but the same frames would score);
* ``speed_px``: mean centre-of-mass displacement per frame (a static digit would score ~0);
* ``identity_consistent``: share of clips whose frames are all classified as the same digit;
* ``appearance_mse``: mean squared difference between consecutive re-normalised frames (same digit, same scale:
  small for real clips; a digit that changes shape from frame to frame scores higher).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def clip_metrics(clips: torch.Tensor, labels: torch.Tensor, classifier, wan) -> dict:
    """clips: (B, F, 1, 28, 28) in [-1, 1]."""
    b, f = clips.shape[:2]
    frames = clips.reshape(b * f, 1, 28, 28)
    normalised = wan.mnist_normalise(frames)
    with torch.no_grad():
        pred = classifier(normalised).argmax(1).view(b, f)
        raw = classifier(frames).argmax(1).view(b, f)
    correct = pred == labels[:, None]
    tracks = wan.centre_of_mass(clips[:, :, 0]).numpy()  # (B, F, 2)
    rng = np.random.default_rng(0)
    shuffled = np.stack([t[rng.permutation(f)] for t in tracks])
    norm = normalised.view(b, f, 28, 28)
    return {
        "per_frame_accuracy": correct.float().mean().item(),
        "per_frame_accuracy_raw_frames": (raw == labels[:, None]).float().mean().item(),
        "clips_all_frames_correct": correct.all(dim=1).float().mean().item(),
        "identity_consistent": (pred == pred[:, :1]).all(dim=1).float().mean().item(),
        "track_rms_px_median": float(np.median(wan.track_residual(tracks))),
        "track_rms_px_mean": float(np.mean(wan.track_residual(tracks))),
        "track_rms_px_time_shuffled_median": float(np.median(wan.track_residual(shuffled))),
        "speed_px": float(np.linalg.norm(np.diff(tracks, axis=1), axis=-1).mean()),
        "appearance_mse": ((norm[:, 1:] - norm[:, :-1]) ** 2).mean().item(),
    }


def save_strip(clips: torch.Tensor, labels, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b, f = clips.shape[:2]
    fig, axes = plt.subplots(b, f, figsize=(f * 0.9, b * 0.9 + 0.4))
    for i in range(b):
        for j in range(f):
            ax = axes[i, j]
            ax.imshow(((clips[i, j, 0] + 1) / 2).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(str(int(labels[i])), rotation=0, labelpad=10, fontsize=9)
            if i == 0:
                ax.set_title(f"frame {j}", fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(pad=0.2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--path", default=None, help="a pipeline folder (default: the bundled mnist-wan)")
    ap.add_argument("--clips", type=int, default=100)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--guidance", type=float, nargs="+", default=None, help="default: wan.DEFAULT_GUIDANCE")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--png", type=Path, default=None, help="write a strip of one clip per class here")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from tcpade_fx import models
    from tcpade_fx.models import wan
    from tcpade_fx.models.classifier import load_classifier

    if args.path:
        pipe = wan.MNISTWanPipeline.from_pretrained(args.path, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
    else:
        pipe = models.load("mnist-wan")
    classifier = load_classifier()
    args.guidance = args.guidance or [wan.DEFAULT_GUIDANCE]
    seeds = list(range(args.clips))
    labels = torch.tensor([s % 10 for s in seeds])

    real = wan.MovingDigits().clips([10_000 + s for s in seeds], labels.tolist()).transpose(1, 2)
    report = {"clips": args.clips, "steps": args.steps, "real": clip_metrics(real, labels, classifier, wan)}
    print(json.dumps({"real": report["real"]}))
    for g in args.guidance:
        start = time.perf_counter()
        out = []
        for i in range(0, args.clips, args.batch):
            gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + args.batch]]
            out.append(pipe(labels[i:i + args.batch].tolist(), num_inference_steps=args.steps, guidance_scale=g,
                            generator=gens, output_type="pt").frames)
        clips = torch.cat(out)
        seconds = time.perf_counter() - start
        m = clip_metrics(clips, labels, classifier, wan)
        m["sampling_seconds"] = round(seconds, 1)
        report[f"guidance_{g}"] = m
        print(json.dumps({f"guidance {g}": m}), flush=True)
        if args.png and g == args.guidance[0]:
            pick = [seeds.index(next(s for s in seeds if s % 10 == c)) for c in range(10)]
            save_strip(clips[pick], labels[pick], args.png,
                       f"mnist-wan samples (seeds 0-9, {args.steps} steps, guidance {g}); rows: asked class")
            print(f"wrote {args.png}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
