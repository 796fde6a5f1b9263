"""``tcpade-fx demo``: the same seeds sampled with the full pipeline and with TC-Padé, side by side.

    tcpade-fx demo                                   # bundled mnist-dit, policy balanced, 28 steps
    tcpade-fx demo --model mnist-flux --policy fast --steps 20 --seeds 16 --out out/demo
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def run_demo(args: argparse.Namespace) -> dict:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    import tcpade_fx
    from tcpade_fx import metrics, models

    console = Console()
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seeds))
    labels = [s % 10 for s in seeds]
    latents = metrics.seeded_latents(seeds)
    call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="pt")

    with console.status(f"loading {args.model}"):
        full = models.load(args.model)
        accelerated = tcpade_fx.compile(models.load(args.model), policy=args.policy, backend=args.backend)

    full_times, fast_times = [], []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("sampling (full and TC-Padé, interleaved)", total=2 * (args.repeats + 1))
        # one warm-up each (capture + verification on the first TC-Padé call), then interleaved timed repeats
        reference = full(labels, latents=latents, **call).images
        progress.advance(task)
        images = accelerated(labels, latents=latents, **call).images
        progress.advance(task)
        for _ in range(args.repeats):
            t, _ = _timed(lambda: full(labels, latents=latents, **call))
            full_times.append(t)
            progress.advance(task)
            t, images = _timed(lambda: accelerated(labels, latents=latents, **call).images)
            fast_times.append(t)
            progress.advance(task)

    stats = accelerated.tcpade.stats
    t_full, t_fast = statistics.median(full_times), statistics.median(fast_times)
    result = {
        "model": args.model,
        "policy": args.policy,
        "backend": args.backend,
        "steps": args.steps,
        "seeds": args.seeds,
        "threads": args.threads,
        "computed_steps": stats.computed,
        "compute_fraction": stats.compute_fraction,
        "ideal_speedup": 1 / stats.compute_fraction,
        "median_seconds_full": t_full,
        "median_seconds_tcpade": t_fast,
        "speedup": t_full / t_fast,
        "psnr_db": metrics.psnr(reference, images),
        "ssim": metrics.ssim(reference, images),
        "schedule": stats.decisions(),
    }
    _save_grid(reference, images, out_dir / "grid.png", args)
    _save_step_plot(stats, out_dir / "steps.png", args)
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))

    table = Table(title=f"TC-Padé demo: {args.model}, policy {args.policy!r}, {args.steps} steps, {args.seeds} seeds")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("block-stack steps computed", f"{stats.computed}/{len(stats.records)} ({100 * stats.compute_fraction:.0f} %)")
    table.add_row("schedule (C computed, . predicted)", stats.decisions())
    table.add_row("wall clock full / TC-Padé (median)", f"{t_full:.2f} s / {t_fast:.2f} s")
    table.add_row("measured speedup", f"{result['speedup']:.2f}x (ideal {result['ideal_speedup']:.2f}x)")
    table.add_row("PSNR vs full", f"{result['psnr_db']:.2f} dB")
    table.add_row("SSIM vs full", f"{result['ssim']:.4f}")
    console.print(table)
    console.print(f"wrote {out_dir / 'grid.png'}, {out_dir / 'steps.png'}, {out_dir / 'result.json'}")
    return result


def _save_grid(reference: torch.Tensor, images: torch.Tensor, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = reference.shape[0]
    fig, axes = plt.subplots(3, n, figsize=(1.2 * n, 4.0), squeeze=False)
    rows = [("full", reference), ("TC-Padé", images), ("|diff| x4", (images - reference).abs() * 4 - 1)]
    for r, (name, batch) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(((batch[c, 0].clamp(-1, 1) + 1) / 2).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle(f"{args.model}, {args.steps} steps, policy {args.policy}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _save_step_plot(stats, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in stats.records if r.branch == 0]
    steps = [r.step for r in recs]
    fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(7, 4), sharex=True)
    ax0.bar(steps, [1 if r.computed else 0.4 for r in recs], color=["tab:blue" if r.computed else "tab:orange" for r in recs])
    ax0.set_yticks([0.4, 1])
    ax0.set_yticklabels(["predicted", "computed"])
    ax0.set_title(f"TC-Padé decisions ({args.policy}, {args.steps} steps)", fontsize=9)
    est = [(r.step, r.error_estimate) for r in recs if r.error_estimate is not None]
    chk = [(r.step, r.check_error) for r in recs if r.check_error is not None]
    if est:
        ax1.plot(*zip(*est), "o-", color="tab:orange", label="predicted error (estimate)")
    if chk:
        ax1.plot(*zip(*chk), "s", color="tab:blue", label="actual error of the prediction, checked at computed steps")
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_ylabel("relative residual error")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tcpade-fx", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="full vs TC-Padé on a bundled model: speedup, PSNR/SSIM, grid and step plot")
    demo.add_argument("--model", default="mnist-dit", choices=["mnist-dit", "mnist-flux"])
    demo.add_argument("--policy", default="balanced", help="quality | balanced | fast | full")
    demo.add_argument("--backend", default="eager", choices=["eager", "inductor"])
    demo.add_argument("--steps", type=int, default=28)
    demo.add_argument("--seeds", type=int, default=16, help="images sampled (seeds 0..n-1, digit = seed mod 10)")
    demo.add_argument("--guidance", type=float, default=1.5)
    demo.add_argument("--repeats", type=int, default=3, help="timed repeats of each run (median reported)")
    demo.add_argument("--threads", type=int, default=1)
    demo.add_argument("--out", default="out/demo")
    args = parser.parse_args(argv)
    if args.command == "demo":
        run_demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
