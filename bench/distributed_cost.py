"""What tcpade_fx's own collectives cost under context parallelism: per transformer call, how many, how many bytes
each process sends, and how long they take; against one step of the same model.

    torchrun --standalone --nproc-per-node 2 bench/distributed_cost.py [--steps 20] [--repeats 2000]

Two measurements, on the tiny Flux pipeline with Ulysses attention (gloo, CPU):

1. in the run: the reducer's counters (calls, bytes, host-side seconds) over a ``balanced`` trajectory, per call.
   The seconds include waiting for the slower process (the processes share the cores), so they bound the cost;
2. the collectives alone: after a barrier, ``repeats`` back-to-back ``all_gather_into_tensor`` of the packs a step
   sends (the decision guard with the denominator fit, then the finiteness and check statistics), timed.

The result is printed as JSON (rank 0) and appended to bench/results/distributed_cost.jsonl. The estimate for
8 GPUs over NVLink against a FLUX.1-dev step at 1024² is on paper: bench/DISTRIBUTED.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tcpade_fx.testing_distributed import (
    context_parallel_config,
    cpu_context_parallel_workarounds,
    init_gloo,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cpu_context_parallel_workarounds()
    rank, world = init_gloo(timeout_s=120)
    import torch.distributed as dist

    import tcpade_fx
    from tcpade_fx.testing_pipelines import tiny_flux_pipeline

    pipe, call = tiny_flux_pipeline(seed=0)
    pipe.transformer.enable_parallelism(config=context_parallel_config("ulysses"))
    tcpade_fx.compile(pipe, policy="balanced")
    run = dict(**{**call, "output_type": "latent"}, num_inference_steps=args.steps)
    pipe(**run, generator=torch.Generator().manual_seed(0))  # capture
    reducer = pipe.tcpade._parallel.reducer
    before = reducer.cost.as_dict()
    dist.barrier()
    start = time.perf_counter()
    cpu0 = time.process_time()
    pipe(**run, generator=torch.Generator().manual_seed(0))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    after = reducer.cost.as_dict()
    stats = pipe.tcpade.stats
    calls = len(stats.records)
    used = {k: after[k] - before[k] for k in after}

    # the packs of one step with batch 1 (float64 elements): guard (2 x 6) + fit (3 + 1); predict: 1;
    # compute with history: 1 + modulation (3 + 1) + error (3) + velocity (3)
    sizes = {"decision+fit": 16, "predicted: finiteness": 1, "computed: finiteness+check": 11}
    alone = {}
    for name, n in sizes.items():
        packed = torch.zeros(n, dtype=torch.float64)
        rows = torch.empty(world * n, dtype=torch.float64)
        for _ in range(50):
            dist.all_gather_into_tensor(rows, packed)
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(args.repeats):
            dist.all_gather_into_tensor(rows, packed)
        alone[name] = {"bytes_sent": n * 8, "wall_us": 1e6 * (time.perf_counter() - t0) / args.repeats,
                       "cpu_us": 1e6 * (time.process_time() - c0) / args.repeats}
    result = {
        "model": "tiny Flux pipeline (tests), Ulysses 2, gloo, CPU, float32", "world_size": world,
        "steps": args.steps, "transformer_calls": calls, "computed": stats.computed,
        "decisions": stats.decisions(0),
        "in_run": {"collectives": used["calls"], "per_call": used["calls"] / calls,
                   "bytes_sent": used["bytes"], "bytes_per_call": used["bytes"] / calls,
                   "seconds": used["seconds"], "ms_per_call": 1e3 * used["seconds"] / calls,
                   "trajectory_wall_s": wall, "trajectory_cpu_s": cpu, "ms_per_call_total": 1e3 * wall / calls},
        "collective_alone": alone, "repeats": args.repeats, "rank": rank,
    }
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        text = json.dumps(gathered, indent=1)
        print(text)
        out = ROOT / "bench" / "results" / "distributed_cost.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "ranks": gathered}) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
