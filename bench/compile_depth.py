"""Inductor compile time at FLUX.1-dev depth: tcpade-fx's graphs against torch.compile and regional compilation.

    python bench/compile_depth.py                        # every mode, fresh process each -> bench/COMPILE_DEPTH.md
    python bench/compile_depth.py --modes tcpade regional --repeats 1
    python bench/compile_depth.py --one tcpade           # one measurement in this process (what the driver runs)

The model is a *narrow* FluxTransformer2DModel with FLUX.1-dev's depth (19 dual-stream + 38 single-stream blocks)
and a tiny width (2 heads x 16, 8 latent channels, 16 image + 8 text tokens): what inductor compiles grows with the
number of ops (the depth), hardly with the width, so this isolates compile time at real depth on a CPU. Each
measurement runs in a fresh subprocess with ``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` (cold: no FX-graph, AOT or
kernel cache) and one thread. Modes:

- ``eager``: the plain forward (what one call costs without compiling);
- ``tcpade``: ``tcpade_fx.compile(transformer, "balanced", backend="inductor")``; its first call (capture,
  verification, the compute graph's compile and run) and its first predicted call (the predict graph's compile);
- ``tcpade-eager``: the same with ``backend="eager"`` (what capture and verification cost without inductor);
- ``tcpade-regional``: ``tcpade`` with ``backend_options={"regional": True}`` (one inductor compile per group of
  identical blocks, plus head, tail and the predict graph);
- ``torch.compile``: ``torch.compile(transformer, fullgraph=True)``, first call;
- ``regional``: diffusers' ``transformer.compile_repeated_blocks(fullgraph=True)``, first call.

Each mode runs a 10-step trajectory twice (bare transformer, timesteps 1.0 ... 0.1; tcpade: ``begin(10)`` each
time): compile time is the cold trajectory minus the warm one (for tcpade the first call serves the verified
reference's outputs, so the compute graph compiles at the second computed call and the predict graph at the first
predicted call). The warm calls are the steady cost the compile buys.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's tcpade_fx, also when another one is installed
MODES = ("eager", "tcpade-eager", "tcpade", "tcpade-regional", "torch.compile", "regional")
TCPADE = ("tcpade", "tcpade-eager", "tcpade-regional")
DOUBLE, SINGLE = 19, 38


def narrow_flux(double: int = DOUBLE, single: int = SINGLE):
    """The narrow FluxTransformer2DModel at FLUX.1-dev depth and its example call (batch 1, 16 image + 8 text
    tokens)."""
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=8, out_channels=8, num_layers=double, num_single_layers=single,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
        guidance_embeds=False, axes_dims_rope=(4, 6, 6),
    ).eval()
    g = torch.Generator().manual_seed(0)
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    kwargs = dict(
        hidden_states=torch.randn(1, 16, 8, generator=g),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
        pooled_projections=torch.randn(1, 16, generator=g),
        timestep=torch.full((1,), 1.0),
        img_ids=torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float(),
        txt_ids=torch.zeros(8, 3),
        return_dict=False,
    )
    return model, kwargs


def _at(kwargs: dict, t: float) -> dict:
    import torch

    return {**kwargs, "timestep": torch.full((1,), t)}


def measure(mode: str, double: int = DOUBLE, single: int = SINGLE, backend_options: dict | None = None) -> dict:
    """One cold measurement of ``mode`` in this process (call it in a fresh one): seconds of the first call (and of
    the first predicted call for the tcpade modes), the warm call, and backend compile counts."""
    import torch

    import tcpade_fx

    torch.set_num_threads(1)
    torch._dynamo.reset()
    model, kwargs = narrow_flux(double, single)
    result: dict = {"mode": mode, "double": double, "single": single,
                    "parameters": sum(p.numel() for p in model.parameters()), "torch": torch.__version__}
    steps = 10
    times = [1.0 - i / steps for i in range(steps)]
    tcpade = mode in TCPADE
    if tcpade:
        if mode == "tcpade-regional":
            backend_options = {**(backend_options or {}), "regional": True}
        tcpade_fx.compile(model, "balanced", backend="eager" if mode == "tcpade-eager" else "inductor",
                          backend_options=backend_options)
    elif mode == "torch.compile":
        model = torch.compile(model, fullgraph=True)
    elif mode == "regional":
        model.compile_repeated_blocks(fullgraph=True)
    elif mode != "eager":
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")

    def trajectory() -> list[float]:
        if tcpade:
            model.tcpade.begin(steps)
        seconds = []
        for t in times:
            start = time.perf_counter()
            model(**_at(kwargs, t))
            seconds.append(time.perf_counter() - start)
        return seconds

    with torch.no_grad():
        cold = trajectory()  # captures and compiles on the way
        if tcpade:
            result["captures"] = model.tcpade.stats.captures  # begin() starts new stats
        warm = trajectory()  # the same calls again: nothing left to compile
    result["cold_trajectory_s"] = sum(cold)
    result["warm_trajectory_s"] = sum(warm)
    result["compile_s"] = sum(cold) - sum(warm)
    result["first_call_s"] = cold[0]
    result["cold_calls_s"] = cold
    result["warm_calls_s"] = warm
    if tcpade:
        stats = model.tcpade.stats
        kinds = ["C" if r.computed else "." for r in stats.records]
        result["schedule"] = "".join(kinds)
        result["compiles"] = dict(stats.compiles)
        result["notes"] = list(stats.notes)
        result["warm_compute_call_s"] = statistics.median(s for s, k in zip(warm, kinds) if k == "C")
        result["warm_predict_call_s"] = statistics.median(s for s, k in zip(warm, kinds) if k == ".")
    else:
        result["warm_compute_call_s"] = statistics.median(warm)
    if mode in ("torch.compile", "regional"):
        from torch._dynamo.utils import counters

        result["dynamo_frames"] = dict(counters["stats"])
    return result


def _run_fresh(mode: str, args) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--one", mode, "--double", str(args.double), "--single", str(args.single)]
    if args.backend_options:
        cmd += ["--backend-options", args.backend_options]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"mode": mode, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.2f}"


def report(rows: list[dict], args) -> str:
    """The Markdown table of ``rows`` (medians per mode; ratios against torch.compile and regional)."""
    by_mode: dict[str, list[dict]] = {}
    for r in rows:
        if "error" not in r:
            by_mode.setdefault(r["mode"], []).append(r)

    def med(mode: str, key: str):
        vals = [r[key] for r in by_mode.get(mode, []) if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    torch_version = next((r["torch"] for r in rows if "torch" in r), "?")
    lines = [
        f"Narrow FluxTransformer2DModel, {args.double} dual + {args.single} single blocks, 2 heads x 16, 16 image + "
        f"8 text tokens, batch 1; torch {torch_version}, CPU, 1 thread, cold (fresh process, "
        f"TORCHINDUCTOR_FORCE_DISABLE_CACHES=1), median of {args.repeats}. Compile = a 10-step trajectory run cold "
        "minus the same trajectory run again (tcpade: \"balanced\", capture + verification + both graphs' compiles).",
        "",
        "| mode | compile, s | first call, s | warm call, s | compile vs torch.compile | compile vs regional |",
        "|---|---|---|---|---|---|",
    ]
    ref_full, ref_regional = med("torch.compile", "compile_s"), med("regional", "compile_s")
    for mode in MODES:
        if mode not in by_mode:
            continue
        c = med(mode, "compile_s")
        warm = med(mode, "warm_compute_call_s")
        warm_text = _fmt(warm) if mode not in TCPADE else \
            f"{_fmt(warm)} computed / {_fmt(med(mode, 'warm_predict_call_s'))} predicted"
        lines.append(
            f"| {mode} | {_fmt(c)} | {_fmt(med(mode, 'first_call_s'))} | {warm_text} | "
            f"{_fmt(c / ref_full) + 'x' if c and ref_full else '—'} | "
            f"{_fmt(c / ref_regional) + 'x' if c and ref_regional else '—'} |"
        )
    for mode in TCPADE:
        if mode in by_mode:
            r = by_mode[mode][0]
            calls = ", ".join(f"{k}{s:.1f}" for k, s in zip(r["schedule"], r["cold_calls_s"]))
            lines.append(f"\n{mode}: cold calls (C computed, . predicted, seconds): {calls}; backend compiles "
                         f"{r.get('compiles')}, captures {r.get('captures')}")
    for mode in ("torch.compile", "regional"):
        if mode in by_mode:
            lines.append(f"\n{mode}: dynamo {by_mode[mode][0].get('dynamo_frames')}")
    for r in rows:
        if "error" in r:
            lines.append(f"\n{r['mode']}: failed: {r['error']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--repeats", type=int, default=1, help="fresh processes per mode (interleaved)")
    ap.add_argument("--double", type=int, default=DOUBLE)
    ap.add_argument("--single", type=int, default=SINGLE)
    ap.add_argument("--backend-options", default=None, help="JSON dict passed as tcpade_fx.compile(backend_options=)")
    ap.add_argument("--one", choices=MODES, help="measure one mode in this process and print its JSON")
    ap.add_argument("--jsonl", type=Path, default=ROOT / "bench" / "results" / "compile_depth.jsonl")
    ap.add_argument("--out", type=Path, default=None, help="write the report here (e.g. bench/COMPILE_DEPTH.md)")
    args = ap.parse_args()
    options = json.loads(args.backend_options) if args.backend_options else None
    if args.one:
        print(json.dumps(measure(args.one, args.double, args.single, options)))
        return
    rows = []
    for rep in range(args.repeats):
        for mode in args.modes:  # interleaved: a load change on the shared machine hits every mode alike
            row = _run_fresh(mode, args)
            row["backend_options"] = options
            rows.append(row)
            print(json.dumps(row), flush=True)
            args.jsonl.parent.mkdir(parents=True, exist_ok=True)
            with args.jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
    text = report(rows, args)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
