"""The benchmark: TC-Padé against every baseline and peer on the bundled trained models, at equal compute.

    python bench/benchmark.py                                   # both models, 20/28/50 steps, 100 samples, then the report
    python bench/benchmark.py --models mnist-dit --steps 20 28 --samples 100
    python bench/report.py                                      # only BENCHMARKS.md + pareto.png from the results

It ends by writing BENCHMARKS.md and bench/pareto.png from every row in the results folder (bench/report.py).

Rows are appended to bench/results/<model>.jsonl as they finish; a rerun skips rows already there (resumable).
Same seeds (latents) for every row. Per row:

* compute: fraction of block-stack evaluations relative to the full N-step run (fewer-steps rows: steps / N);
* speedup: wall clock of the full run / this row, 1 thread, interleaved in one process, median of repeats, on a
  timing batch (``--timing-samples``);
* PSNR / SSIM against the full run of the same scheduler (what a cache promises: fidelity to the user's sampler);
* PSNR against a converged reference: the same noise solved with 100 UniPC steps;
* FD / KID in the bundled classifier's feature space against the 5,000 real digits, and class accuracy.

The video model ``mnist-wan`` (``--models mnist-wan``) gets the same rows; its samples are clips (B, F, 1, 28, 28)
and every metric is taken over frames (:class:`VideoSamples`): PSNR over all frames, SSIM averaged over frames,
FD / KID / accuracy on each frame's classifier features after ``wan.mnist_normalise`` (as examples/eval_wan.py),
against the frames of 625 real moving-digit clips (5,000 frames) normalised the same way, plus the median
``track_rms_px`` (temporal consistency, ``wan.track_residual``). Its guidance is the pipeline's default
(``wan.DEFAULT_GUIDANCE``), not the image models' 1.5.
"""

from __future__ import annotations

import argparse
import json
import re
import warnings
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tcpade_fx  # noqa: E402
from tcpade_fx import Policy, metrics, models  # noqa: E402
from tcpade_fx.models.classifier import load_classifier  # noqa: E402
from tcpade_fx.models.mnist import load_mnist_digits  # noqa: E402

RESULTS = ROOT / "bench" / "results"
GUIDANCE = 1.5


def euler(shift: float = 1.0):
    """The benchmark's Euler flow scheduler at a model's time shift (σ → s·σ / (1 + (s - 1)·σ))."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def unipc(shift: float = 1.0):
    """UniPC on the flow sigmas of the same time shift as :func:`euler`."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)


def sample_images(pipe, labels, latents, steps: int, guidance: float = GUIDANCE) -> torch.Tensor:
    """One seeded call of an image pipeline at the benchmark's guidance: the images (B, 1, 28, 28) in [-1, 1]."""
    with torch.no_grad():
        return pipe(labels, latents=latents, num_inference_steps=steps, guidance_scale=guidance,
                    output_type="pt").images


class ImageSamples:
    """What the benchmark needs to know about a model's samples: here images (B, 1, 28, 28) in ``.images``."""

    output = "images"
    latent_shape = (1, 28, 28)
    guidance = GUIDANCE
    #: transformer calls per denoising step at this guidance (the image pipelines batch both guidance branches)
    calls_per_step = 1

    def frames(self, samples: torch.Tensor) -> torch.Tensor:
        """The samples as (N, 1, 28, 28) frames for PSNR / SSIM."""
        return samples

    def classifier_input(self, frames: torch.Tensor) -> torch.Tensor:
        return frames

    def frame_labels(self, labels: list[int]) -> torch.Tensor:
        return torch.tensor(labels)

    def real_frames(self) -> torch.Tensor:
        return load_mnist_digits()[0]

    def extra_metrics(self, samples: torch.Tensor) -> dict:
        return {}


class VideoSamples(ImageSamples):
    """``mnist-wan`` clips (B, F, 1, 28, 28) in ``.frames``; the metrics are per frame (see the module docstring)."""

    output = "frames"
    calls_per_step = 2  # guidance as two transformer calls per step, cond then uncond, as WanPipeline does
    REAL_CLIPS = 625
    REAL_SEED0 = 20_000

    def __init__(self):
        from tcpade_fx.models import wan

        self.wan = wan
        self.latent_shape = (1, wan.NUM_FRAMES, 28, 28)
        self.guidance = wan.DEFAULT_GUIDANCE

    def frames(self, samples: torch.Tensor) -> torch.Tensor:
        return samples.reshape(-1, 1, *samples.shape[-2:])

    def classifier_input(self, frames: torch.Tensor) -> torch.Tensor:
        return self.wan.mnist_normalise(frames)

    def frame_labels(self, labels: list[int]) -> torch.Tensor:
        return torch.tensor(labels).repeat_interleave(self.wan.NUM_FRAMES)

    def real_frames(self) -> torch.Tensor:
        seeds = range(self.REAL_SEED0, self.REAL_SEED0 + self.REAL_CLIPS)
        clips = self.wan.MovingDigits().clips(seeds, [s % 10 for s in seeds])  # (B, 1, F, 28, 28)
        return self.frames(clips.transpose(1, 2))

    def extra_metrics(self, samples: torch.Tensor) -> dict:
        tracks = self.wan.centre_of_mass(samples[:, :, 0]).numpy()
        return {"track_rms_px": round(float(statistics.median(self.wan.track_residual(tracks))), 3)}


SAMPLES = {"mnist-wan": VideoSamples}


def scheduler_shift(model: str) -> float:
    """The ``shift`` of the scheduler bundled with ``model`` (what ``models.load(model)`` samples with)."""
    config = models.WEIGHTS_DIR / model / "scheduler" / "scheduler_config.json"
    return float(json.loads(config.read_text()).get("shift", 1.0)) if config.exists() else 1.0


class Bench:
    def __init__(self, model: str, samples: int, timing_samples: int, repeats: int, batch: int,
                 fd_only: bool = False, shift: float | None = None):
        self.fd_only = fd_only
        self.model = model
        self.kind = SAMPLES.get(model, ImageSamples)()
        self.guidance = self.kind.guidance
        #: the time shift of the model's bundled scheduler (mnist-wan samples at Wan's shift 3, the image models at 1):
        #: every Euler / UniPC row of this model, full runs included, uses it, as a user's default call would
        self.shift = scheduler_shift(model) if shift is None else shift
        self.samples = samples
        self.repeats = repeats
        self.batch = batch
        self.seeds = list(range(samples))
        self.labels = [s % 10 for s in self.seeds]
        self.latents = self.latents_for(self.seeds)
        self.timing_labels = self.labels[:timing_samples]
        self.timing_latents = self.latents[:timing_samples]
        self.classifier = load_classifier()
        with torch.no_grad():
            self.real_feats = self.classifier.features(self.kind.classifier_input(self.kind.real_frames()))
        self.out_path = RESULTS / f"{model}.jsonl"
        self.done: dict = {}
        if self.out_path.exists():
            for line in self.out_path.read_text().splitlines():
                row = json.loads(line)
                self.done[(row["steps"], row["label"], row["samples"], row.get("shift", 1.0))] = row
        self._cache: dict = {}

    def latents_for(self, seeds: list[int]) -> torch.Tensor:
        """One noise tensor per seed (the same for a seed in any subset)."""
        return metrics.seeded_latents(seeds, self.kind.latent_shape)

    def given(self, seeds: list[int]) -> dict:
        """``sample``'s keywords for these seeds: class ``seed % 10`` and :meth:`latents_for`."""
        return dict(labels=[s % 10 for s in seeds], latents=self.latents_for(seeds))

    # -- running ---------------------------------------------------------------------------------------------
    def euler(self):
        return euler(self.shift)

    def unipc(self):
        return unipc(self.shift)

    def pipe(self, scheduler=None, policy=None, hook=None):
        pipe = models.load(self.model)
        if scheduler is not None:
            pipe.scheduler = scheduler
        if policy is not None:
            tcpade_fx.compile(pipe, policy=policy)
        if hook is not None:
            hook(pipe)
        return pipe

    def sample(self, pipe, steps: int, labels=None, latents=None) -> torch.Tensor:
        labels = self.labels if labels is None else labels
        latents = self.latents if latents is None else latents
        out = []
        self.calls = self.computed_calls = 0
        self.schedules = []
        for i in range(0, len(labels), self.batch):
            result = pipe(labels[i:i + self.batch], latents=latents[i:i + self.batch], num_inference_steps=steps,
                          guidance_scale=self.guidance, output_type="pt")
            out.append(getattr(result, self.kind.output))
            runtime = getattr(pipe, "tcpade", None)
            if runtime is not None:
                self.calls += len(runtime.stats.records)
                self.computed_calls += runtime.stats.computed
                self.schedules.append(runtime.stats.decisions())
        return torch.cat(out)

    def reference(self, name: str, make, steps: int) -> torch.Tensor:
        key = (name, steps)
        if key not in self._cache:
            shift = "" if self.shift == 1.0 else f"-shift{self.shift:g}"
            path = RESULTS / "cache" / f"{self.model}-{name}-{steps}-{self.samples}{shift}.pt"
            if path.exists():
                self._cache[key] = torch.load(path, weights_only=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._cache[key] = self.sample(make(), steps)
                torch.save(self._cache[key], path)
        return self._cache[key]

    def time_ratio(self, full_pipe, full_steps: int, pipe, steps: int) -> float:
        """Median over repeats of t(full) / t(row), the two runs interleaved."""
        run = lambda p, n: self.sample(p, n, self.timing_labels, self.timing_latents)  # noqa: E731
        run(pipe, steps)  # warm-up (capture, verification)
        ratios = []
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            run(full_pipe, full_steps)
            t1 = time.perf_counter()
            run(pipe, steps)
            t2 = time.perf_counter()
            ratios.append((t1 - t0) / (t2 - t1))
        return statistics.median(ratios)

    def row(self, steps: int, label: str, family: str, make, *, run_steps: int | None = None, full_of=None,
            extra: dict | None = None) -> dict | None:
        """Run one configuration ``make()`` (a pipeline) for ``run_steps`` (default N) and record it."""
        if (steps, label, self.samples, self.shift) in self.done:
            return self.done[(steps, label, self.samples, self.shift)]
        run_steps = run_steps or steps
        full_name, full_make = full_of or ("euler", lambda: self.pipe(self.euler()))
        full = self.reference(full_name, full_make, steps)
        converged = None if self.fd_only else self.reference("converged", lambda: self.pipe(self.unipc()), 100)
        pipe = make()
        t0 = time.perf_counter()
        images = self.sample(pipe, run_steps)
        seconds = time.perf_counter() - t0
        if self.calls:
            computed = self.computed_calls / self.calls * run_steps / steps
            schedule = self.schedules[0]
        elif extra and "compute" in extra:
            computed = extra["compute"]
            schedule = None
        else:
            computed = run_steps / steps
            schedule = None
        speedup = None if self.fd_only else self.time_ratio(full_make(), steps, pipe, run_steps)
        frames, full_frames = self.kind.frames(images), self.kind.frames(full)
        with torch.no_grad():
            feats = self.classifier.features(self.kind.classifier_input(frames))
            accuracy = (self.classifier.head(feats).argmax(1) == self.kind.frame_labels(self.labels)).float().mean().item()
        result = {
            "model": self.model, "steps": steps, "label": label, "family": family, "samples": self.samples,
            "compute": round(computed, 4), "computed_steps": round(computed * steps, 2),
            "speedup": None if speedup is None else round(speedup, 3),
            "ideal_speedup": round(1 / computed, 3) if computed else None,
            "psnr_full": round(metrics.psnr(full, images), 3),
            "ssim_full": round(metrics.ssim(full_frames, frames), 4),
            "psnr_converged": None if converged is None else round(metrics.psnr(converged, images), 3),
            "fd": round(metrics.frechet_distance(self.real_feats, feats), 3),
            "kid": round(metrics.kernel_inception_distance(self.real_feats, feats), 5),
            "accuracy": round(accuracy, 4), "schedule": schedule, "seconds": round(seconds, 1),
            "full": full_name, "guidance": self.guidance, "shift": self.shift, **self.kind.extra_metrics(images),
        }
        if extra:
            result.update({k: v for k, v in extra.items() if k != "compute"})
        if self.fd_only:
            result["fd_only"] = True
        with self.out_path.open("a") as f:
            f.write(json.dumps(result) + "\n")
        self.done[(steps, label, self.samples, self.shift)] = result
        timing = "" if speedup is None else f" speedup {speedup:4.2f}"
        conv = "" if converged is None else f" conv {result['psnr_converged']:6.2f}"
        print(f"{self.model} N={steps} {label:<34} compute {computed:5.2f}{timing} PSNR {result['psnr_full']:6.2f}"
              f"{conv} FD {result['fd']:7.2f} KID {result['kid']:.5f} acc {accuracy:.3f}", flush=True)
        return result


def fixed_interval_for(steps: int, computed: int, early: int) -> int:
    """The fixed-schedule interval whose compute count is closest to ``computed`` (warm-up + last step kept)."""
    best, best_gap = 1, math.inf
    for k in range(1, steps):
        count = early + len(range(early, steps - 1, k)) + 1
        if abs(count - computed) < best_gap:
            best, best_gap = k, abs(count - computed)
    return best


def run_model(bench: Bench, steps_list: list[int], presets: list[str], peers: bool, peers_only: bool = False,
              core_only: bool = False, peer_match: str | None = None) -> None:
    b = bench
    for n in steps_list:
        if peers_only:
            from peers import peer_rows  # bench/peers.py

            for label, family, make, extra in peer_rows(b, n, peer_match):
                if peer_match is None or re.search(peer_match, label):
                    b.row(n, label, family, make, extra=extra)
            continue
        b.row(n, "full (Euler)", "full", lambda: b.pipe(b.euler()))
        b.row(n, "full (UniPC)", "full", lambda: b.pipe(b.unipc()), full_of=("unipc", lambda: b.pipe(b.unipc())))
        for preset in presets:
            policy = Policy.preset(preset)
            r = b.row(n, f"TC-Padé {preset}", "tcpade", lambda: b.pipe(b.euler(), policy))
            c = max(2, round(r["computed_steps"]))
            b.row(n, f"fewer steps Euler ({c})", "fewer", lambda: b.pipe(b.euler()), run_steps=c)
            b.row(n, f"fewer steps UniPC ({c})", "fewer", lambda: b.pipe(b.unipc()), run_steps=c)
            if core_only:
                continue
            if preset == "balanced":  # the opt-in input gate (Policy.input_gate) on the preset: same plan
                gated = policy.replace(input_gate=True)
                b.row(n, f"TC-Padé {preset} + input gate", "tcpade-opt-in", lambda: b.pipe(b.euler(), gated))
            mask = r["schedule"]
            ablations = (("reuse", 0), ("taylor", 1), ("taylor", 2)) if preset == "balanced" else (("reuse", 0), ("taylor", 1))
            for method, order in ablations:
                name = "reuse" if method == "reuse" else f"Taylor-{order}"
                replay = Policy(method=method, order=order, late_order=min(order, 1), schedule="explicit", mask=mask)
                b.row(n, f"{name} on {preset} schedule", "same-schedule", lambda: b.pipe(b.euler(), replay))
            early = math.ceil(policy.early_end * (n - 1)) if n > 1 else 1
            k = fixed_interval_for(n, c, max(early, 3))
            fixed_rows = (("reuse", 0, "reuse"), ("taylor", 1, "Taylor-1"), ("pade", 1, "Padé [1/1]"))
            for method, order, name in fixed_rows if preset == "balanced" else fixed_rows[1:]:
                # plain Padé (μ = 1): the ablation of the extrapolant alone on a fixed schedule
                fixed = Policy(method=method, order=order, late_order=order, schedule="fixed", interval=k,
                               early_end=max(early, 3) / max(1, n - 1), modulate_denominator=False)
                b.row(n, f"{name} fixed every {k}", "fixed", lambda: b.pipe(b.euler(), fixed))
            if preset == "balanced":
                b.row(n, f"TC-Padé {preset} on UniPC", "tcpade+unipc", lambda: b.pipe(b.unipc(), policy),
                      full_of=("unipc", lambda: b.pipe(b.unipc())))
        if peers:
            from peers import peer_rows  # bench/peers.py

            for label, family, make, extra in peer_rows(b, n):
                b.row(n, label, family, make, extra=extra)


def main() -> None:
    global RESULTS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mnist-dit", "mnist-flux"])
    ap.add_argument("--steps", nargs="+", type=int, default=[20, 28, 50])
    ap.add_argument("--presets", nargs="+", default=["quality", "balanced", "fast"])
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--timing-samples", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--peers-only", action="store_true", help="run only the peer rows (e.g. beside a --no-peers run)")
    ap.add_argument("--core-only", action="store_true", help="only full, TC-Padé presets and fewer-steps rows")
    ap.add_argument("--peer-match", default=None, metavar="REGEX",
                    help="only the peer rows whose label matches (e.g. '^cache-dit' beside '^diffusers' in a second "
                         "process; both append to the same results)")
    ap.add_argument("--results", default=str(RESULTS), help="folder of the resumable JSONL results")
    ap.add_argument("--fd-only", action="store_true",
                    help="no timing and no converged reference: the rows' FD/KID/PSNR at a large --samples (the "
                         "report adds them to the tables of the same model and steps)")
    args = ap.parse_args()
    RESULTS = Path(args.results)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*[Ss]ingular.*")
    RESULTS.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "bench"))
    for model in args.models:
        bench = Bench(model, args.samples, args.timing_samples, args.repeats, args.batch, args.fd_only)
        run_model(bench, args.steps, args.presets, not args.no_peers, args.peers_only, args.core_only, args.peer_match)
    from report import write_report  # bench/report.py

    if RESULTS.resolve() == (ROOT / "bench" / "results").resolve():
        write_report(RESULTS)
    else:  # a scratch results folder gets its own report, beside its rows
        write_report(RESULTS, RESULTS / "BENCHMARKS.md", RESULTS / "pareto.png")


if __name__ == "__main__":
    main()
