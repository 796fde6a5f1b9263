"""TC-Padé on several processes: data parallelism (one request per process) or context parallelism (one request
split over the processes with diffusers' Ulysses or Ring attention).

    torchrun --standalone --nproc-per-node 2 examples/multi_gpu.py --mode data      # a request per process
    torchrun --standalone --nproc-per-node 2 examples/multi_gpu.py --mode ulysses   # one request, tokens split
    torchrun --standalone --nproc-per-node 2 examples/multi_gpu.py --mode ring
    torchrun --standalone --nproc-per-node 4 examples/multi_gpu.py --mode both      # ring 2 x ulysses 2

It runs the tiny random-weight Flux (or ``--model wan``) pipeline of tcpade_fx.testing_pipelines, on CPU with gloo
(the two diffusers CPU workarounds of tcpade_fx.testing_distributed applied) or on one GPU per process with NCCL.
For FLUX.1-dev replace ``pipeline()`` by ``FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev",
torch_dtype=torch.bfloat16).to(device)`` and call it with a prompt: the tcpade_fx lines stay the same.

* Data parallelism: each process compiles its own pipeline and takes its own decisions for its own request; nothing
  is communicated. A batch of requests in one call shares one decision per step and guidance branch (the largest
  checked error over the batch decides; the Padé denominator is still fitted per request).
* Context parallelism: ``enable_parallelism`` before or after ``tcpade_fx.compile``, no other change. tcpade_fx
  reduces its statistics over the context-parallel mesh, so that every process takes the same decisions (it checks
  that they do, and stops all processes with a clear error where they would not, instead of deadlocking).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tcpade_fx
from tcpade_fx.testing_distributed import (
    context_parallel_config,
    cpu_context_parallel_workarounds,
)


def pipeline(model: str, seed: int):
    from tcpade_fx.testing_pipelines import tiny_flux_pipeline, tiny_wan_pipeline

    return tiny_flux_pipeline(seed=seed) if model == "flux" else tiny_wan_pipeline(seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("data", "ulysses", "ring", "both"), default="ulysses")
    parser.add_argument("--model", choices=("flux", "wan"), default="flux")
    parser.add_argument("--policy", default="balanced")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile-first", action="store_true",
                        help="call tcpade_fx.compile before enable_parallelism (either order works)")
    args = parser.parse_args()

    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(1)
        cpu_context_parallel_workarounds()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    # data parallelism: a different request (here: seed) per process; context parallelism: the same request
    seed = rank if args.mode == "data" else 0
    pipe, call = pipeline(args.model, seed)
    pipe.to(device)
    parallel = args.mode != "data"
    if parallel and not args.compile_first:
        pipe.transformer.enable_parallelism(config=context_parallel_config(args.mode))
    tcpade_fx.compile(pipe, policy=args.policy)
    if parallel and args.compile_first:
        pipe.transformer.enable_parallelism(config=context_parallel_config(args.mode))

    out = pipe(**{**call, "output_type": "latent"}, num_inference_steps=args.steps,
               generator=torch.Generator().manual_seed(seed))
    latents = out[0] if isinstance(out, tuple) else getattr(out, "images", getattr(out, "frames", None))
    stats = pipe.tcpade.stats
    contexts = sorted({r.context for r in stats.records if r.context}) or [0]
    decisions = "  ".join(f"{c}: {stats.decisions(c)}" for c in contexts)
    cost = pipe.tcpade._parallel.reducer.cost if pipe.tcpade._parallel is not None else None
    extra = (f"; tcpade_fx collectives: {cost.calls} ({cost.bytes} B sent, {1e3 * cost.seconds:.1f} ms)"
             if cost else "")
    print(f"[rank {rank}/{world}] {args.mode}: {stats.computed}/{len(stats.records)} calls computed; {decisions}; "
          f"latents sum {float(latents.double().sum()):.6f}{extra}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
