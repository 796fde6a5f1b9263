"""The GPU check of issue 15: tcpade-fx on random-weight FLUX.1-dev and Wan2.1-1.3B geometry, one prepared run.

    bash bench/gpu_check.sh                    # on the GPU machine: installs the carried wheels, runs this, ~10 min
    python bench/gpu_check.py --smoke          # the same script on the CPU with tiny sizes (tests/test_gpu_check_smoke.py)

What it measures, per geometry (each a bare transformer driven like a pipeline drives it: ``runtime.begin`` with the
schedule, ``runtime.step_done`` after each Euler step, batch 1, one guidance branch, the same initial noise):

- the full trajectory (the untouched transformer) and TC-Padé "balanced" and "fast", with the eager backend (and
  "balanced" forecasting every block's attention/FFN outputs, ``granularity="modules"``: ``--backends modules``), with
  inductor (``backend="inductor"``) and with the CUDA-graph options (``backend_options={"cuda_graphs": True}`` and
  ``{"mode": "reduce-overhead"}``; recorded as not available where ``tcpade_fx.compile`` refuses them), and with
  TensorRT where ``torch_tensorrt`` imports; diffusers' regional compile (``compile_repeated_blocks``) and
  ``torch.compile(fullgraph=True)`` of the untouched transformer as the compiled baselines;
- per configuration: the trajectory's time (CUDA events, median of ``--repeats`` after a first cold run), its compile
  time (cold run minus warm run), speedup against the full eager trajectory and against the ideal (steps / computed),
  the final latents' relative error against the full trajectory, peak memory (``torch.cuda.max_memory_allocated``,
  reset before each configuration) and host syncs per step (``tcpade_fx.testing.count_host_syncs``, eager).

Random weights say nothing about image quality: the relative error is only a check that a backend computes what the
eager one does. It writes the report to ``--out`` (bench/GPU.md) and one JSON line per configuration to ``--jsonl``.
Within ``--budget`` seconds: a configuration that would start after it is recorded as skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Geometry:
    """One model geometry: the diffusers class, its config, and how to make its inputs and timestep."""

    name: str
    description: str
    cls_name: str
    config: dict
    make_inputs: Callable[[torch.device, torch.dtype], dict]  # everything but timestep (hidden_states included)
    time_scale: float  # timestep = sigma * time_scale (Flux: 1, Wan: 1000)


def _flux_inputs(image_side: int, text_tokens: int, channels: int, text_dim: int, pooled_dim: int, guidance: bool):
    def make(device: torch.device, dtype: torch.dtype) -> dict:
        g = torch.Generator(device="cpu").manual_seed(0)
        rows, cols = torch.meshgrid(torch.arange(image_side), torch.arange(image_side), indexing="ij")
        kw = dict(
            hidden_states=torch.randn(1, image_side * image_side, channels, generator=g),
            encoder_hidden_states=torch.randn(1, text_tokens, text_dim, generator=g),
            pooled_projections=torch.randn(1, pooled_dim, generator=g),
            img_ids=torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float(),
            txt_ids=torch.zeros(text_tokens, 3),
        )
        out = {k: v.to(device=device, dtype=dtype if k not in ("img_ids", "txt_ids") else torch.float32)
               for k, v in kw.items()}
        if guidance:
            out["guidance"] = torch.full((1,), 3.5, device=device, dtype=torch.float32)
        return out

    return make


def _wan_inputs(channels: int, frames: int, height: int, width: int, text_tokens: int, text_dim: int):
    def make(device: torch.device, dtype: torch.dtype) -> dict:
        g = torch.Generator(device="cpu").manual_seed(0)
        return dict(
            hidden_states=torch.randn(1, channels, frames, height, width, generator=g).to(device, dtype),
            encoder_hidden_states=torch.randn(1, text_tokens, text_dim, generator=g).to(device, dtype),
        )

    return make


def geometries(smoke: bool, wan_frames: int) -> dict[str, Geometry]:
    """FLUX.1-dev (19 + 38 blocks, 1024² = 4096 image + 512 text tokens) and Wan2.1-1.3B (30 blocks, 480x832,
    ``wan_frames`` frames); with ``smoke`` the same classes at tiny sizes."""
    if smoke:
        flux_cfg = dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=4, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                        axes_dims_rope=(4, 6, 6))
        wan_cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                       out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=3, cross_attn_norm=True,
                       qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
        return {
            "flux-dev": Geometry("flux-dev", "FluxTransformer2DModel, SMOKE sizes (2 + 4 blocks, 2 heads x 16, 16 "
                                 "image + 8 text tokens)", "FluxTransformer2DModel", flux_cfg,
                                 _flux_inputs(4, 8, 8, 32, 16, True), 1.0),
            "wan2.1-1.3b": Geometry("wan2.1-1.3b", "WanTransformer3DModel, SMOKE sizes (3 blocks, 2 heads x 12, "
                                    "2 x 8 x 8 latents)", "WanTransformer3DModel", wan_cfg,
                                    _wan_inputs(4, 2, 8, 8, 8, 16), 1000.0),
        }
    flux_cfg = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                    axes_dims_rope=(16, 56, 56))
    wan_cfg = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                   out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
    latent_frames = (wan_frames - 1) // 4 + 1
    wan_tokens = latent_frames * 30 * 52
    return {
        "flux-dev": Geometry("flux-dev", "FLUX.1-dev geometry (FluxTransformer2DModel, 19 + 38 blocks, hidden 3072, "
                             "1024x1024: 4096 image + 512 text tokens)", "FluxTransformer2DModel", flux_cfg,
                             _flux_inputs(64, 512, 64, 4096, 768, True), 1.0),
        "wan2.1-1.3b": Geometry("wan2.1-1.3b", f"Wan2.1-1.3B geometry (WanTransformer3DModel, 30 blocks, hidden 1536, "
                                f"480x832, {wan_frames} frames: {wan_tokens} video + 512 text tokens)",
                                "WanTransformer3DModel", wan_cfg,
                                _wan_inputs(16, latent_frames, 60, 104, 512, 4096), 1000.0),
    }


def build(geometry: Geometry, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The model with random weights, created directly on ``device`` in ``dtype`` (initialising 12 B parameters
    on the CPU would take minutes)."""
    import diffusers

    cls = getattr(diffusers, geometry.cls_name)
    default = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = cls(**geometry.config)
    finally:
        torch.set_default_dtype(default)
    return model.eval().requires_grad_(False)


class Driver:
    """Runs a trajectory the way a diffusers pipeline drives the transformer (Euler on a flow-matching schedule;
    with tcpade-fx: ``begin`` with the schedule, ``step_done`` after each step)."""

    def __init__(self, geometry: Geometry, steps: int, device: torch.device, dtype: torch.dtype):
        self.steps = steps
        self.inputs = geometry.make_inputs(device, dtype)
        self.x0 = self.inputs.pop("hidden_states")
        sigmas = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
        self.sigmas = sigmas.tolist() + [0.0]
        self.grid = [s * geometry.time_scale for s in self.sigmas[:-1]]
        # every timestep made on the device once, before any timing: none is copied from the host in the loop
        self.timesteps = [torch.full((1,), t, device=device, dtype=torch.float32) for t in self.grid]
        self.dts = [torch.tensor(self.sigmas[i + 1] - self.sigmas[i], device=device, dtype=torch.float32)
                    for i in range(steps)]

    def __call__(self, model) -> torch.Tensor:
        runtime = getattr(model, "tcpade", None)
        if runtime is not None:
            runtime.begin(self.steps, schedule=[self.grid])
        x = self.x0.clone()
        with torch.inference_mode():
            for i in range(self.steps):
                v = model(hidden_states=x, timestep=self.timesteps[i], return_dict=False, **self.inputs)[0]
                x = (x.float() + self.dts[i] * v.float()).to(x.dtype)
                if runtime is not None:
                    runtime.step_done()
        return x


def _timed(fn, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000, out
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else None


@dataclass
class Row:
    geometry: str
    config: str
    status: str = "ok"  # ok | not available | skipped | failed
    detail: str = ""
    seconds: float | None = None  # median warm trajectory
    compile_seconds: float | None = None  # cold trajectory minus warm
    computed: int | None = None
    steps: int | None = None
    rel_error: float | None = None
    peak_bytes: int | None = None
    syncs_per_step: float | None = None
    syncs_by_kind: dict | None = None
    extra: dict = field(default_factory=dict)


class Check:
    """Runs the configurations of one geometry, keeping the reference output and the time budget."""

    def __init__(self, args, geometry: Geometry, device: torch.device, dtype: torch.dtype, deadline: float,
                 on_row: Callable[[], None] = lambda: None):
        self.args, self.geometry, self.device, self.dtype, self.deadline = args, geometry, device, dtype, deadline
        self.on_row = on_row  # called after each configuration: the report is rewritten, a kill loses little
        self.rows: list[Row] = []
        self.reference: torch.Tensor | None = None
        self.full_seconds: float | None = None
        t0 = time.perf_counter()
        self.model = build(geometry, device, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
        self.build_seconds = time.perf_counter() - t0
        self.parameters = sum(p.numel() for p in self.model.parameters())
        self.weights_bytes = torch.cuda.memory_allocated() if device.type == "cuda" else None
        self.drive = Driver(geometry, args.steps, device, dtype)

    def _row(self, config: str) -> Row:
        row = Row(self.geometry.name, config)
        self.rows.append(row)
        return row

    def run(self, config: str, model, *, count_syncs: bool = False, expect_compile: bool = False) -> Row:
        """Time ``model``'s trajectory: one cold run (compiles), ``--repeats`` warm ones."""
        row = self._row(config)
        _peak_reset(self.device)
        cold, _ = _timed(lambda: self.drive(model), self.device)
        warm, out = [], None
        for _ in range(self.args.repeats):
            s, out = _timed(lambda: self.drive(model), self.device)
            warm.append(s)
        row.peak_bytes = _peak(self.device)
        row.seconds = statistics.median(warm)
        row.compile_seconds = cold - min(warm) if expect_compile else None
        row.steps = self.args.steps
        runtime = getattr(model, "tcpade", None)
        if runtime is not None:
            row.computed = runtime.stats.computed
            row.extra["schedule"] = runtime.stats.decisions(0)
            row.extra["compiles"] = dict(runtime.stats.compiles)
            row.extra["notes"] = list(dict.fromkeys(runtime.stats.notes))[:5]
        else:
            row.computed = self.args.steps
        if self.reference is None:
            self.reference, self.full_seconds = out.float(), row.seconds
        else:
            ref = self.reference
            row.rel_error = float((out.float() - ref).norm() / ref.norm().clamp_min(1e-12))
        if count_syncs:
            from tcpade_fx.testing import count_host_syncs

            with count_host_syncs(self.model) as counter:
                self.drive(model)
            row.syncs_per_step = counter.syncs / self.args.steps
            row.syncs_by_kind = {kind: max(v) for kind, v in counter.per_kind().items()}
            row.extra["syncs_outside_calls"] = counter.outside
            row.extra["to_device_per_step"] = counter.to_device / self.args.steps
        return row

    def attempt(self, config: str, fn: Callable[[], Row | None], needs: float) -> None:
        """Run ``fn`` (which adds its rows) when ``needs`` seconds of the budget are left; a failure becomes a
        failed row with the error, and the check goes on."""
        left = self.deadline - time.perf_counter()
        if left < needs:
            row = self._row(config)
            row.status, row.detail = "skipped", f"time budget: {max(left, 0):.0f} s left, needs ~{needs:.0f} s"
            self.on_row()
            return
        try:
            fn()
        except Exception as exc:  # one configuration failing must not cost the others' figures
            row = self._row(config)
            row.status = "failed"
            row.detail = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            traceback.print_exc()
        finally:
            import tcpade_fx

            tcpade_fx.disable(self.model)
            torch._dynamo.reset()
            self.on_row()


def tcpade_configs(check: Check, label: str, backend: str, options: dict | None, count_syncs: bool) -> None:
    """One capture with ``backend``/``options``, then "balanced" and "fast" on it (the policy is read at each
    trajectory's begin, so the graphs are not captured twice)."""
    import tcpade_fx
    from tcpade_fx.policy import resolve_policy

    model = check.model
    try:
        tcpade_fx.compile(model, "balanced", backend=backend, backend_options=options)
    except (TypeError, ValueError, RuntimeError) as exc:
        row = check._row(f"{label} balanced")
        row.status, row.detail = "not available", f"tcpade_fx.compile refused it: {type(exc).__name__}: {exc}"
        return
    first = check.run(f"{label} balanced", model, count_syncs=count_syncs, expect_compile=True)
    first.extra["first_trajectory_includes"] = "capture + verification + backend compile"
    model.tcpade.policy = resolve_policy("fast")
    check.run(f"{label} fast", model, count_syncs=count_syncs)


def modules_config(check: Check) -> None:
    """"balanced" forecasting every block's attention/FFN outputs with Taylor-1 (``granularity="modules"``, eager):
    whether the history passes over 2–3·L times the stack residual's data cost less than the skipped blocks on a
    GPU (on the CPU with the bundled tiny mnist-wan they do not: bench/STEP_COST.md)."""
    import tcpade_fx

    policy = tcpade_fx.Policy.preset("balanced").replace(granularity="modules", method="taylor",
                                                         modulate_denominator=False)
    label = "tcpade eager modules balanced"
    try:
        tcpade_fx.compile(check.model, policy, backend="eager")
        row = check.run(label, check.model, expect_compile=True)
        row.extra["policy"] = "balanced, granularity='modules', Taylor-1"
        row.extra["first_trajectory_includes"] = "capture + verification"
    except Exception as exc:  # an out-of-memory history is a result here, not a crash of the whole check
        row = check._row(label)
        row.status, row.detail = "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    finally:
        tcpade_fx.disable(check.model)


def try_option(check: Check, label: str, options: dict) -> None:
    """A backend option that may not exist yet: "not available" where compile or the first call refuses it."""
    import tcpade_fx

    if check.device.type != "cuda":
        row = check._row(f"{label} balanced")
        row.status, row.detail = "not available", "CUDA graphs need a CUDA device (this run is on the CPU)"
        return
    try:
        tcpade_fx.compile(check.model, "balanced", backend="inductor", backend_options=options)
        check.drive(check.model)  # the first call captures and compiles: an unknown option fails here
    except Exception as exc:
        row = check._row(f"{label} balanced")
        row.status, row.detail = "not available", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        tcpade_fx.disable(check.model)
        torch._dynamo.reset()
        return
    tcpade_fx.disable(check.model)
    tcpade_configs(check, label, "inductor", options, count_syncs=False)


#: seconds a configuration needs at least (what is left of the budget decides whether it starts)
NEEDS = {"eager": 20.0, "compiled": 150.0}


def eager_phase(args, check: Check) -> None:
    """The full trajectory (the reference) and TC-Padé with the eager backend: the figures that matter most."""
    check.attempt("full eager", lambda: check.run("full eager", check.model, count_syncs=True), NEEDS["eager"])
    if "eager" in args.backends:
        check.attempt("tcpade eager", lambda: tcpade_configs(check, "tcpade eager", "eager", None, count_syncs=True),
                      NEEDS["eager"])
    if "modules" in args.backends:
        check.attempt("tcpade eager modules", lambda: modules_config(check), NEEDS["eager"])


def compiled_phase(args, check: Check) -> None:
    """TC-Padé compiled (inductor, the CUDA-graph options, TensorRT), then the compiled baselines."""
    backends, needs = set(args.backends), NEEDS["compiled"]
    if "inductor" in backends:
        check.attempt("tcpade inductor", lambda: tcpade_configs(check, "tcpade inductor", "inductor", None, False),
                      needs)
    if "cuda-graphs" in backends:
        check.attempt("tcpade inductor cuda_graphs=True",
                      lambda: try_option(check, "tcpade inductor cuda_graphs=True", {"cuda_graphs": True}), needs)
        check.attempt("tcpade inductor mode=reduce-overhead",
                      lambda: try_option(check, "tcpade inductor mode=reduce-overhead", {"mode": "reduce-overhead"}),
                      needs)
    if "tensorrt" in backends:
        try:
            import torch_tensorrt  # noqa: F401
        except ImportError as exc:
            row = check._row("tcpade tensorrt")
            row.status, row.detail = "not available", f"torch_tensorrt does not import here ({exc}): TensorRT skipped"
        else:
            check.attempt("tcpade tensorrt", lambda: tcpade_configs(check, "tcpade tensorrt", "tensorrt", None, False),
                          needs)
    if "regional" in backends:
        def regional():
            # in place: the blocks stay compiled, so this is the last configuration of the geometry
            check.model.compile_repeated_blocks(fullgraph=True)
            check.run("full compile_repeated_blocks", check.model, expect_compile=True)

        check.attempt("full compile_repeated_blocks", regional, needs)
    if "torch.compile" in backends:
        def full_compile():
            compiled = torch.compile(check.model, fullgraph=True)
            check.run("full torch.compile(fullgraph=True)", compiled, expect_compile=True)

        check.attempt("full torch.compile(fullgraph=True)", full_compile, needs)


def _gib(b: int | None) -> str:
    return "—" if b is None else f"{b / 2**30:.2f}"


def _f(x, fmt=".3f") -> str:
    return "—" if x is None else format(x, fmt)


def report(args, checks: list[Check], device: torch.device, header: dict) -> str:
    smoke = " — CPU SMOKE RUN: tiny sizes, not GPU figures" if args.smoke else ""
    lines = [f"## gpu_check{smoke}", "",
             ", ".join(f"{k}: {v}" for k, v in header.items()), ""]
    for check in checks:
        g = check.geometry
        lines += [f"### {g.description}", "",
                  f"{check.parameters / 1e6:,.1f} M parameters ({args.dtype}), built on {device} in "
                  f"{check.build_seconds:.1f} s; weights {_gib(check.weights_bytes)} GiB; {args.steps} steps, "
                  f"batch 1, one branch; times: {'CUDA events' if device.type == 'cuda' else 'host clock'}, median of "
                  f"{args.repeats} warm trajectories.", "",
                  "| configuration | status | trajectory, s | compile, s | speedup vs full eager | ideal | "
                  "of ideal | computed | rel. error vs full | peak memory, GiB | host syncs / step (max per call "
                  "kind) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in check.rows:
            speed = check.full_seconds / r.seconds if r.seconds and check.full_seconds else None
            ideal = r.steps / r.computed if r.computed and r.steps else None
            kinds = ", ".join(f"{k} {v}" for k, v in (r.syncs_by_kind or {}).items())
            syncs = f"{_f(r.syncs_per_step, '.1f')} ({kinds})" if r.syncs_per_step is not None else "—"
            status = r.status + (f": {r.detail}" if r.detail else "")
            lines.append(
                f"| {r.config} | {status} | {_f(r.seconds)} | {_f(r.compile_seconds, '.1f')} | "
                f"{_f(speed, '.2f')} | {_f(ideal, '.2f')} | "
                f"{_f(speed / ideal * 100 if speed and ideal else None, '.0f')}{'%' if speed and ideal else ''} | "
                f"{r.computed if r.computed is not None else '—'}/{r.steps or '—'} | {_f(r.rel_error, '.2e')} | "
                f"{_gib(r.peak_bytes)} | {syncs} |")
        schedules = {r.config: r.extra["schedule"] for r in check.rows if "schedule" in r.extra}
        if schedules:
            lines += ["", "Schedules (C computed, . predicted): " +
                      "; ".join(f"{k} `{v}`" for k, v in schedules.items())]
        notes = sorted({n for r in check.rows for n in r.extra.get("notes", [])})
        if notes:
            lines += ["", "Notes: " + " | ".join(notes)]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (the test of this script)")
    ap.add_argument("--geometries", nargs="+", default=["flux-dev", "wan2.1-1.3b"])
    ap.add_argument("--backends", nargs="+",
                    default=["eager", "modules", "inductor", "cuda-graphs", "tensorrt", "regional", "torch.compile"],
                    choices=["eager", "modules", "inductor", "cuda-graphs", "tensorrt", "regional", "torch.compile"])
    ap.add_argument("--steps", type=int, default=None, help="default 20 (smoke: 10)")
    ap.add_argument("--repeats", type=int, default=None, help="warm trajectories timed (default 2; smoke: 1)")
    ap.add_argument("--wan-frames", type=int, default=33, help="Wan frames (81 = 32,760 tokens; 33 = 14,040)")
    ap.add_argument("--dtype", default=None, help="default bfloat16 (smoke: float32)")
    ap.add_argument("--device", default=None, help="default cuda (smoke: cpu)")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds; configurations after it are skipped")
    ap.add_argument("--out", type=Path, default=None, help="report (default bench/GPU.md; smoke: not written)")
    ap.add_argument("--jsonl", type=Path, default=None, help="one JSON line per configuration")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (smoke default: 1)")
    args = ap.parse_args(argv)
    if args.threads or args.smoke:
        torch.set_num_threads(args.threads or 1)
    args.steps = args.steps or (10 if args.smoke else 20)
    args.repeats = args.repeats or (1 if args.smoke else 2)
    args.dtype = args.dtype or ("float32" if args.smoke else "bfloat16")
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device here: run with --smoke (CPU, tiny sizes) or on the GPU machine")
    dtype = getattr(torch, args.dtype)
    deadline = time.perf_counter() + args.budget
    import diffusers

    import tcpade_fx

    header = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
              "torch": torch.__version__, "diffusers": diffusers.__version__, "tcpade_fx": tcpade_fx.__version__,
              "budget_s": args.budget}
    if device.type == "cpu":
        header["threads"] = torch.get_num_threads()
    all_geometries = geometries(args.smoke, args.wan_frames)
    checks: list[Check] = []
    written: set[int] = set()

    def write() -> None:
        for check in checks:
            for r in check.rows:
                if id(r) in written:
                    continue
                written.add(id(r))
                print(json.dumps(vars(r)), flush=True)
                if args.jsonl:
                    args.jsonl.parent.mkdir(parents=True, exist_ok=True)
                    with args.jsonl.open("a") as f:
                        f.write(json.dumps({**vars(r), "header": header}) + "\n")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(report(args, checks, device, header) + "\n")

    # the eager figures of every geometry first, then the compiled ones: a spent budget costs the latter
    for name in args.geometries:
        checks.append(Check(args, all_geometries[name], device, dtype, deadline, on_row=write))
        eager_phase(args, checks[-1])
    for check in checks:
        compiled_phase(args, check)
    header["elapsed_s"] = round(args.budget - (deadline - time.perf_counter()), 1)
    write()
    print(report(args, checks, device, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
