"""The multi-process side of tests/test_distributed.py: run under ``torchrun --nproc-per-node 2`` (gloo, CPU).

    torchrun --nproc-per-node 2 tests/distributed_worker.py OUT_DIR SCENARIO [SCENARIO ...]

Each process writes ``OUT_DIR/<scenario>.rank<r>.json`` (decisions per branch, notes, collectives in the graphs,
the cost of tcpade_fx's own collectives) and ``.pt`` (the final latents). Scenarios: see :data:`SCENARIOS`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

from tcpade_fx.testing_distributed import (
    context_parallel_config,
    cpu_context_parallel_workarounds,
    init_gloo,
    per_process_statistics_reducer,
)

STEPS = 16


def error_controlled():
    """Pure error control (no compute budget): every decision hangs on the estimate against the tolerance, so
    per-process statistics make the processes disagree (tiny Flux, 16 steps: at step 2 the estimate is 0.0416 on
    process 0 and 0.0355 on process 1 against the tolerance of 0.04; 0.0384 over both)."""
    import tcpade_fx

    return tcpade_fx.Policy(compute_budget=None, mid_tolerance=0.04, late_tolerance=0.02)


#: name -> (pipeline, context-parallel kind, enable_parallelism before compile?, policies run in turn, reducer)
SCENARIOS = {
    "flux_ulysses_error": ("flux", "ulysses", True, ("error",), None),
    "flux_ring_presets": ("flux", "ring", False, ("balanced", "quality", "gap"), None),
    "wan_ulysses_fast": ("wan", "ulysses", True, ("fast", "modules"), None),
    "flux_ulysses_per_process": ("flux", "ulysses", True, ("error",), "per_process"),
}


def pipeline(name: str):
    from tcpade_fx.testing_pipelines import tiny_flux_pipeline, tiny_wan_pipeline

    return tiny_flux_pipeline(seed=0) if name == "flux" else tiny_wan_pipeline(seed=0)


def forecast_modules():
    """"fast" forecasting every block's attention/FFN outputs (the attention's all-to-alls leave the predict graph
    on every process alike)."""
    import tcpade_fx

    return tcpade_fx.Policy.preset("fast").replace(granularity="modules", method="taylor", modulate_denominator=False)


def gap_corrected():
    """"balanced" with Policy.gap_correction: the corrected computed steps are elementwise on each process's tokens."""
    import tcpade_fx

    return tcpade_fx.Policy.preset("balanced").replace(gap_correction=1.0, gap_span_limit=math.inf)


def policy_of(name: str):
    return {"error": error_controlled, "modules": forecast_modules, "gap": gap_corrected}.get(name, lambda: name)()


def run_pipeline(pipe, kwargs, policy_name: str | None):
    """One trajectory of ``STEPS`` steps (latents out); with a policy, compiled with it first."""
    import tcpade_fx

    if policy_name is not None:
        tcpade_fx.compile(pipe, policy=policy_of(policy_name))
    out = pipe(**{**kwargs, "output_type": "latent"}, num_inference_steps=STEPS,
               generator=torch.Generator().manual_seed(1))
    latents = out[0] if isinstance(out, tuple) else (out.images if hasattr(out, "images") else out.frames)
    return latents.detach().clone()


def graph_collectives(runtime) -> dict:
    """Functional collectives in the runtime's graphs, by graph and op name."""
    found: dict = {}
    for graphs in [runtime.graphs]:  # the one input signature of these runs
        for which in ("compute", "predict"):
            gm = getattr(graphs, which)
            for node in getattr(gm, "graph", torch.fx.Graph()).nodes:
                name = str(node.target)
                if "c10d" in name:
                    op = name.split(".")[1] if "." in name else name
                    found.setdefault(which, {}).setdefault(op, 0)
                    found[which][op] += 1
    return found


def records(stats) -> list[dict]:
    return [{"step": r.step, "branch": r.branch, "context": r.context, "computed": r.computed, "reason": r.reason,
             "error_estimate": r.error_estimate, "check_error": r.check_error, "gap_corrected": r.gap_corrected}
            for r in stats.records]


def total_cost() -> dict:
    """tcpade_fx's own collectives so far in this process (every group's reducer)."""
    import tcpade_fx.distributed as tdist

    costs = [r.cost.as_dict() for r in tdist._REDUCERS.values()]
    return {k: sum(c[k] for c in costs) for k in ("calls", "bytes", "seconds")}


def export_refusal(pipe, kwargs) -> str | None:
    """What exporting the context-parallel transformer says (None: it did not refuse)."""
    from tcpade_fx.distributed import UnsupportedParallelismError
    from tcpade_fx.export.capture import capture_for_export

    try:
        capture_for_export(pipe, {**kwargs, "num_inference_steps": 2})
    except UnsupportedParallelismError as exc:
        return str(exc)
    return None


def input_gate_refusal(pipe, kwargs) -> str | None:
    """What running ``Policy.input_gate`` on the context-parallel transformer says (None: it ran)."""
    import tcpade_fx
    from tcpade_fx.distributed import UnsupportedParallelismError

    tcpade_fx.compile(pipe, policy=tcpade_fx.Policy.preset("balanced").replace(input_gate=True))
    try:
        pipe(**{**kwargs, "num_inference_steps": 2})
    except UnsupportedParallelismError as exc:
        return str(exc)
    finally:
        tcpade_fx.disable(pipe)
    return None


def run(name: str, out: Path, rank: int) -> None:
    import tcpade_fx.distributed as tdist

    model, *_, reducer = SCENARIOS[name]
    pipe, kwargs = pipeline(model)
    original_reducer_for = tdist.reducer_for
    if reducer == "per_process":
        made = {}
        tdist.reducer_for = lambda group: made.setdefault(group, per_process_statistics_reducer(group))
    try:
        _run(name, out, rank, pipe, kwargs)
    finally:
        tdist.reducer_for = original_reducer_for


def _run(name: str, out: Path, rank: int, pipe, kwargs) -> None:
    import tcpade_fx
    from tcpade_fx.distributed import DivergedDecisionError

    _, kind, before, policies, _ = SCENARIOS[name]
    result: dict = {"scenario": name, "rank": rank, "runs": []}
    if before:
        pipe.transformer.enable_parallelism(config=context_parallel_config(kind))
    latents = {}
    for k, policy_name in enumerate(policies):
        start = time.perf_counter()
        before_cost = total_cost()
        try:
            if k == 0 and not before:
                tcpade_fx.compile(pipe, policy=policy_of(policy_name))
                pipe.transformer.enable_parallelism(config=context_parallel_config(kind))
                latents[policy_name] = run_pipeline(pipe, kwargs, None)
            else:
                latents[policy_name] = run_pipeline(pipe, kwargs, policy_name)
            error = None
        except DivergedDecisionError as exc:
            error = str(exc)
        runtime = pipe.tcpade
        stats = runtime.stats
        cost = {key: value - before_cost[key] for key, value in total_cost().items()}
        result["runs"].append({
            "policy": policy_name, "error": error, "seconds": time.perf_counter() - start,
            "decisions": {c: stats.decisions(c) for c in sorted({r.context or "" for r in stats.records})}
            if any(r.context for r in stats.records) else {"0": stats.decisions(0)},
            "records": records(stats), "notes": list(stats.notes), "collectives": graph_collectives(runtime),
            "cost": cost, "calls": len(stats.records),
        })
    if not result["runs"][-1]["error"]:
        result["export"] = export_refusal(pipe, kwargs)
        result["input_gate"] = input_gate_refusal(pipe, kwargs)
    torch.save(latents, out / f"{name}.rank{rank}.pt")
    (out / f"{name}.rank{rank}.json").write_text(json.dumps(result, indent=1))


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    cpu_context_parallel_workarounds()
    rank, _ = init_gloo(timeout_s=60)
    import torch.distributed as dist

    for name in argv[1:]:
        run(name, out, rank)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
