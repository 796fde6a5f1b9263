"""``tcpade-fx demo`` and ``tcpade-fx bench``: the same seeds sampled with the full pipeline and with TC-Padé.

    tcpade-fx demo                                   # bundled mnist-dit, policy balanced, 28 steps
    tcpade-fx demo --model mnist-flux --policy fast --steps 20 --seeds 16 --out out/demo
    tcpade-fx bench ~/models/FLUX.1-dev --prompts prompts.txt --steps 28 --policy balanced --dtype bfloat16
    tcpade-fx bench mnist-flux                       # a bundled model (its digits are the "prompts")
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def run_demo(args: argparse.Namespace) -> dict:
    from rich.progress import Progress
    from rich.table import Table

    import tcpade_fx
    from tcpade_fx import metrics, models
    from tcpade_fx.demo_video import demo_inputs, interleaved_medians

    console, out_dir, labels, latents, call = demo_inputs(args)

    with console.status(f"loading {args.model}"):
        full = models.load(args.model)
        accelerated = tcpade_fx.compile(models.load(args.model), policy=args.policy, backend=args.backend)

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("sampling (full and TC-Padé, interleaved)", total=2 * (args.repeats + 1))
        # one warm-up each (capture + verification on the first TC-Padé call), then interleaved timed repeats
        medians, outputs = interleaved_medians({
            "full": lambda: full(labels, latents=latents, **call).images,
            "tcpade": lambda: accelerated(labels, latents=latents, **call).images,
        }, args.repeats, advance=lambda: progress.advance(task))
    reference, images = outputs["full"], outputs["tcpade"]

    stats = accelerated.tcpade.stats
    t_full, t_fast = medians["full"], medians["tcpade"]
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
    _save_grid(reference, images, out_dir / "grid.png", f"{args.model}, {args.steps} steps, policy {args.policy}")
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


def _save_grid(reference: torch.Tensor, images: torch.Tensor, path: Path, title: str) -> None:
    """Full run, TC-Padé and their difference (x4), one column per image; images (B, C, H, W) in [-1, 1], C = 1
    (gray) or 3 (RGB)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = reference.shape[0]
    fig, axes = plt.subplots(3, n, figsize=(1.2 * n, 4.0), squeeze=False)
    diff = ((images - reference).abs().mean(1, keepdim=True) * 4 - 1).clamp(-1, 1)
    rows = [("full", reference), ("TC-Padé", images), ("|diff| x4", diff)]
    for r, (name, batch) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            picture = ((batch[c].float().clamp(-1, 1) + 1) / 2).cpu()
            if picture.shape[0] == 1:
                ax.imshow(picture[0].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(picture[:3].permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle(title, fontsize=9)
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


# -- tcpade-fx bench -----------------------------------------------------------------------------------------------
class BenchInputError(ValueError):
    """What was asked of ``tcpade-fx bench`` does not fit the pipeline (the message says what to pass)."""


def load_pipeline(source: str, device: str, dtype: torch.dtype):
    """A pipeline from a bundled model name (``tcpade_fx.models``) or a local diffusers pipeline folder (offline:
    ``local_files_only``); the bundled pipeline classes are resolved from their own module.

    Raises:
        FileNotFoundError: ``source`` is neither a bundled name nor a folder with a ``model_index.json``.
    """
    from . import models

    if source in models.MODELS:
        return models.load(source, dtype=dtype, device=device)
    path = Path(source).expanduser()
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a diffusers pipeline folder (no model_index.json in it): pass a folder written by "
            f"pipe.save_pretrained(...) or downloaded with huggingface-cli download, or a bundled model "
            f"({', '.join(models.MODELS)})")
    import diffusers
    from diffusers.utils import deprecation_utils

    class_name = json.loads(index_file.read_text()).get("_class_name")
    cls = models.pipeline_class(class_name) if class_name in models.MODELS.values() else diffusers.DiffusionPipeline
    # diffusers renamed torch_dtype to dtype (the old name warns); older releases know only torch_dtype
    dtype_key = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    with models.quiet_loading():
        pipe = cls.from_pretrained(str(path), local_files_only=True, **{dtype_key: dtype})
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def read_prompts(path: str | None) -> list[str]:
    """One prompt per line (blank lines and lines starting with ``#`` skipped); none without a file."""
    if path is None:
        return []
    prompts = [line.strip() for line in Path(path).read_text().splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise BenchInputError(f"{path} holds no prompt: write one per line")
    return prompts


def conditioning(pipe, prompts: list[str]) -> tuple[str, list]:
    """What each image is conditioned on: ``("prompt", texts)`` for a text-to-image/video pipeline,
    ``("class_labels", ids)`` for a class-conditional one (a line is a class id, or a label name the pipeline
    knows: DiT's ``get_label_ids``). Without prompts a class-conditional pipeline gets classes 0..7.

    Raises:
        BenchInputError: the pipeline takes neither, or a text pipeline got no prompts, or a line is no class id.
    """
    import inspect

    params = inspect.signature(type(pipe).__call__).parameters
    if "class_labels" in params:
        if not prompts:
            return "class_labels", list(range(8))
        labels = []
        for p in prompts:
            if p.lstrip("-").isdigit():
                labels.append(int(p))
            elif hasattr(pipe, "get_label_ids"):
                labels.extend(pipe.get_label_ids(p))
            else:
                raise BenchInputError(f"{type(pipe).__name__} is class-conditional: write one class id per line (got {p!r})")
        return "class_labels", labels
    if "prompt" in params:
        if not prompts:
            raise BenchInputError(f"{type(pipe).__name__} takes text prompts: pass --prompts FILE (one prompt per line)")
        return "prompt", prompts
    raise BenchInputError(f"{type(pipe).__name__}.__call__ takes neither prompt nor class_labels; tcpade-fx bench "
                     "cannot condition it")


class _Timer:
    """Wall time of a block: CUDA events on a CUDA device (what the GPU spent, after synchronising), the host
    clock otherwise."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = 0.0

    def __enter__(self) -> "_Timer":
        if self.cuda:
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> bool:
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1000
        else:
            self.seconds = time.perf_counter() - self._t0
        return False


class _PeakMemory:
    """Peak memory of a block: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the process's peak resident
    set (Linux: VmHWM, reset through /proc/self/clear_refs; elsewhere the lifetime peak of ``getrusage``, which
    then covers every run so far). ``label`` says which."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes = 0
        self.label = ""

    @staticmethod
    def _vm_hwm() -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def __enter__(self) -> "_PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self._resettable = self._vm_hwm() is not None
        except OSError:
            self._resettable = False
        return self

    def __exit__(self, *exc) -> bool:
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated(self.device)
            self.label = "torch.cuda.max_memory_allocated"
        elif self._resettable:
            self.bytes = self._vm_hwm() or 0
            self.label = "peak RSS of the process during the run (VmHWM)"
        else:
            import resource

            scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
            self.bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
            self.label = "peak RSS of the process so far (getrusage: not reset between runs)"
        return False


def run_bench(args: argparse.Namespace) -> dict:
    """``tcpade-fx bench``: sample the same seeds with the full pipeline and with TC-Padé (interleaved, after one
    untimed warm-up each), print speedup (measured and ideal), PSNR/SSIM against the full run and peak memory;
    write ``grid.png`` and ``result.json`` to ``--out``. Returns the result dict."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    import tcpade_fx
    from tcpade_fx import metrics
    from tcpade_fx.integration import as_images, install_runtimes

    console = Console()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype):
        raise BenchInputError(f"unknown --dtype {args.dtype!r}: use float32, bfloat16 or float16")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    with console.status(f"loading {args.pipeline} ({device}, {dtype_name})"):
        pipe = load_pipeline(args.pipeline, str(device), dtype)
    key, conditions = conditioning(pipe, read_prompts(args.prompts))
    conditions = conditions[: args.limit] if args.limit else conditions
    seeds = [args.seed + i for i in range(len(conditions))]
    chunks = [list(range(i, min(i + args.batch_size, len(conditions))))
              for i in range(0, len(conditions), args.batch_size)]
    extra = json.loads(args.call_kwargs) if args.call_kwargs else {}
    if args.guidance is not None:
        extra["guidance_scale"] = args.guidance

    def sample(chunk: list[int]):
        call = {key: [conditions[i] for i in chunk], "num_inference_steps": args.steps, "output_type": "np",
                "generator": [torch.Generator().manual_seed(seeds[i]) for i in chunk], **extra}
        with torch.inference_mode():
            return as_images(pipe(**call))

    runs: dict[str, dict] = {"full": {"seconds": [], "memory": None}, "tcpade": {"seconds": [], "memory": None}}
    images: dict[str, torch.Tensor] = {}
    computed = calls = 0
    runtimes = None
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("warm-up (untimed; TC-Padé's first call captures)",
                                 total=2 + 2 * args.repeats * len(chunks))
        sample(chunks[0])
        progress.advance(task)
        tcpade_fx.compile(pipe, policy=tcpade_fx.Policy.preset(args.policy).replace(
            granularity=args.granularity, name=args.policy), backend=args.backend)
        with _Timer(device) as first:
            sample(chunks[0])
        progress.advance(task)
        runtimes = dict(pipe.tcpade_denoisers)
        for repeat in range(args.repeats):
            for name in ("full", "tcpade"):  # interleaved: a load change hits both alike
                if name == "full":
                    tcpade_fx.disable(pipe)
                else:
                    install_runtimes(pipe, runtimes)  # the same runtimes: graphs kept, nothing re-captured
                progress.update(task, description=f"sampling {name} (repeat {repeat + 1}/{args.repeats})")
                batches = []
                with _PeakMemory(device) as memory, _Timer(device) as timer:
                    for chunk in chunks:
                        batches.append(sample(chunk))
                        if name == "tcpade" and repeat == args.repeats - 1:
                            stats = pipe.tcpade.stats
                            computed += stats.computed
                            calls += len(stats.records)
                        progress.advance(task)
                runs[name]["seconds"].append(timer.seconds)
                if runs[name]["memory"] is None or memory.bytes > runs[name]["memory"][0]:
                    runs[name]["memory"] = (memory.bytes, memory.label)
                images.setdefault(name, torch.cat(batches))
    schedule = pipe.tcpade.stats.decisions(0)
    notes = list(dict.fromkeys(pipe.tcpade.stats.notes))
    t_full, t_fast = statistics.median(runs["full"]["seconds"]), statistics.median(runs["tcpade"]["seconds"])
    fraction = computed / calls if calls else 1.0
    result = {
        "pipeline": args.pipeline,
        "pipeline_class": type(pipe).__name__,
        "device": str(device),
        "dtype": dtype_name,
        "policy": args.policy,
        "granularity": args.granularity,
        "backend": args.backend,
        "steps": args.steps,
        "images": len(conditions),
        "conditions": conditions,
        "seeds": seeds,
        "repeats": args.repeats,
        "timing": "CUDA events" if device.type == "cuda" else "host clock (time.perf_counter)",
        "seconds_full": t_full,
        "seconds_tcpade": t_fast,
        "first_call_seconds_tcpade": first.seconds,
        "speedup": t_full / t_fast,
        "ideal_speedup": 1 / fraction,
        "compute_fraction": fraction,
        "schedule": schedule,
        "psnr_db": metrics.psnr(images["full"], images["tcpade"]),
        "ssim": metrics.ssim(images["full"], images["tcpade"]),
        "peak_memory_bytes_full": runs["full"]["memory"][0],
        "peak_memory_bytes_tcpade": runs["tcpade"]["memory"][0],
        "peak_memory_measure": runs["tcpade"]["memory"][1],
        "notes": notes,
    }
    title = f"{Path(args.pipeline).name}, {args.steps} steps, policy {args.policy}"
    _save_grid(images["full"][: args.grid], images["tcpade"][: args.grid], out_dir / "grid.png", title)
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))

    table = Table(title=f"tcpade-fx bench: {result['pipeline_class']} ({device}, {dtype_name}), policy "
                        f"{args.policy!r}, {args.steps} steps, {len(conditions)} images")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("block-stack calls computed", f"{computed}/{calls} ({100 * fraction:.0f} %)")
    table.add_row("schedule (C computed, . predicted)", schedule)
    table.add_row(f"time full / TC-Padé (median of {args.repeats}, {result['timing']})",
                  f"{t_full:.2f} s / {t_fast:.2f} s")
    table.add_row("measured speedup", f"{result['speedup']:.2f}x (ideal {result['ideal_speedup']:.2f}x)")
    table.add_row("TC-Padé first call (capture, verification, compile)", f"{first.seconds:.2f} s")
    table.add_row("PSNR vs full", f"{result['psnr_db']:.2f} dB")
    table.add_row("SSIM vs full", f"{result['ssim']:.4f}")
    table.add_row(f"peak memory full / TC-Padé ({result['peak_memory_measure']})",
                  f"{result['peak_memory_bytes_full'] / 2**20:.0f} MiB / {result['peak_memory_bytes_tcpade'] / 2**20:.0f} MiB")
    console.print(table)
    for note in notes:
        console.print(f"note: {note}")
    console.print(f"wrote {out_dir / 'grid.png'}, {out_dir / 'result.json'}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tcpade-fx", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="full vs TC-Padé on a bundled model: speedup, PSNR/SSIM, grid and step plot")
    demo.add_argument("--model", default="mnist-dit", choices=["mnist-dit", "mnist-flux", "mnist-wan"],
                      help="mnist-wan: clips, demo.gif + strip.png (tcpade_fx.demo_video)")
    demo.add_argument("--policy", default="balanced", help="quality | balanced | fast | full")
    demo.add_argument("--backend", default="eager", choices=["eager", "inductor"])
    demo.add_argument("--steps", type=int, default=None, help="default 28 (mnist-wan: 20)")
    demo.add_argument("--seeds", type=int, default=None,
                      help="images (clips) sampled, seeds 0..n-1, digit = seed mod 10; default 16 (mnist-wan: 4)")
    demo.add_argument("--guidance", type=float, default=None, help="default 1.5 (mnist-wan: the pipeline's)")
    demo.add_argument("--repeats", type=int, default=3, help="timed repeats of each run (median reported)")
    demo.add_argument("--threads", type=int, default=1)
    demo.add_argument("--out", default="out/demo")
    bench = sub.add_parser(
        "bench", help="full vs TC-Padé on a local diffusers pipeline folder (offline): speedup, PSNR/SSIM, memory, grid",
        description="Sample the same seeds with the full pipeline and with TC-Padé; print the measured and ideal "
                    "speedup, PSNR/SSIM against the full run and peak memory; write grid.png and result.json.")
    bench.add_argument("pipeline", metavar="PIPELINE_DIR",
                       help="a diffusers pipeline folder (model_index.json; loaded offline) or a bundled model name")
    bench.add_argument("--prompts", metavar="FILE", help="one prompt per line (class-conditional pipelines: one class "
                       "id per line; default classes 0..7)")
    bench.add_argument("--steps", type=int, default=28)
    bench.add_argument("--policy", default="balanced", help="quality | balanced | fast | full")
    bench.add_argument("--granularity", default="stack", choices=["stack", "modules"],
                       help="what a predicted step forecasts: the block stack's residual, or every block's attention "
                            "and feed-forward outputs (Policy.granularity; more memory, see the README)")
    bench.add_argument("--backend", default="eager", choices=["eager", "inductor"])
    bench.add_argument("--device", default="auto", help="cuda, cuda:1, cpu, ... (auto: cuda when available)")
    bench.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 (auto: bfloat16 on CUDA, "
                       "float32 on the CPU)")
    bench.add_argument("--seed", type=int, default=0, help="image i is sampled with seed SEED + i")
    bench.add_argument("--limit", type=int, default=None, help="use the first N prompts only")
    bench.add_argument("--batch-size", type=int, default=1, help="images per pipeline call")
    bench.add_argument("--repeats", type=int, default=1, help="timed repeats of each run (median reported)")
    bench.add_argument("--guidance", type=float, default=None, help="guidance_scale (default: the pipeline's)")
    bench.add_argument("--call-kwargs", default=None, metavar="JSON",
                       help='more keyword arguments for the pipeline call, e.g. \'{"height": 768, "width": 768}\'')
    bench.add_argument("--grid", type=int, default=8, help="images shown in grid.png")
    bench.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    bench.add_argument("--out", default="out/bench")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo_video import resolve_demo_defaults, run_video_demo

        (run_video_demo if args.model == "mnist-wan" else run_demo)(resolve_demo_defaults(args))
    elif args.command == "bench":
        for name in ("steps", "batch_size", "repeats", "grid"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be at least 1")
        try:
            run_bench(args)
        except (FileNotFoundError, BenchInputError) as exc:
            parser.exit(2, f"tcpade-fx bench: error: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
