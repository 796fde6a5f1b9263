"""TC-Padé on a Flux pipeline in three lines (a tiny random-weight FluxPipeline built offline, so it runs anywhere).

    python examples/flux_tiny.py                   # backend="inductor": two graphs, each compiled once (~1 min)
    python examples/flux_tiny.py --backend eager   # no compilation

With a real checkpoint, replace the tiny pipeline by ``FluxPipeline.from_pretrained(...)`` and pass a prompt.
Random weights make noise images: this shows the mechanics (schedule, compile counts), not quality.
"""

from __future__ import annotations

import argparse

import torch

import tcpade_fx
from tcpade_fx.testing_pipelines import tiny_flux_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="inductor", choices=["eager", "inductor", "tensorrt"])
    parser.add_argument("--policy", default="balanced", help="quality, balanced, fast or full")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe, call_kwargs = tiny_flux_pipeline()  # prompt embeddings stand in for the text encoders
    call_kwargs.update(output_type="pil", num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0))

    pipe = tcpade_fx.compile(pipe, policy=args.policy, backend=args.backend)
    image = pipe(**call_kwargs).images[0]
    print(pipe.tcpade.stats)

    print(f"image: {image.size[0]}x{image.size[1]} {image.mode}")


if __name__ == "__main__":
    main()
