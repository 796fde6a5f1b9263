"""How the module forecast's cost (or the input gate's, ``--compare input-gate``) compares with the stack
forecast's as the transformer gets wider: mnist-wan's pipeline with its transformer replaced by an untrained one of
another width (same patch, tokens, blocks).

    python bench/module_cost_scale.py [--widths 128 512 1024] [--layers 4] [--steps 28] [--clips 1] [--repeats 3]
                                      [--compare modules|input-gate]

Per width: the full run, "balanced" (the stack residual) and "balanced" forecasting every block's attention /
feed-forward outputs with Taylor-1 (``granularity="modules"``), interleaved, CPU time of the one thread, median of
``--repeats``; speedups against the full run next to the ideal N / computed (the plan's, the same for both: the
weights are random, so only the time means something here, not the samples). Widths are heads × 64 with an FFN of
4× the width (Wan2.1's 1.3B model: 1536 / 8960; 14B: 5120 / 13824). Writes nothing; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import tcpade_fx  # noqa: E402
from benchmark import SAMPLES  # noqa: E402
from tcpade_fx import Policy, metrics, models  # noqa: E402
from tcpade_fx.models import wan  # noqa: E402

MODULES = Policy.preset("balanced").replace(granularity="modules", method="taylor", modulate_denominator=False)
#: what --compare sets beside the shipped stack forecast
COMPARED = {"modules": ("balanced, modules Taylor-1", MODULES),
            "input-gate": ("balanced, input gate", Policy.preset("balanced").replace(input_gate=True))}


def transformer_of_width(width: int, layers: int):
    torch.manual_seed(0)
    heads, head_dim = (width // 64, 64) if width >= 64 else (1, width)
    return wan.mnist_wan_transformer(num_attention_heads=heads, attention_head_dim=head_dim, ffn_dim=4 * width,
                                     num_layers=layers).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", nargs="+", type=int, default=[128, 512, 1024])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--clips", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compare", choices=sorted(COMPARED), default="modules")
    args = ap.parse_args()
    label, compared = COMPARED[args.compare]
    torch.set_num_threads(1)
    kind = SAMPLES["mnist-wan"]()
    seeds = list(range(args.clips))
    labels, latents = [s % 10 for s in seeds], metrics.seeded_latents(seeds, kind.latent_shape)
    print(f"| width (FFN) | blocks | full run s | balanced, stack: speedup | {label}: speedup | ideal |")
    print("|---|---|---|---|---|---|")
    for width in args.widths:
        pipes = {}
        for name, policy in (("full", None), ("stack", "balanced"), ("modules", compared)):
            pipe = models.load("mnist-wan")
            pipe.transformer = transformer_of_width(width, args.layers)
            pipes[name] = pipe if policy is None else tcpade_fx.compile(pipe, policy=policy)
        times: dict[str, list[float]] = {name: [] for name in pipes}
        for rep in range(args.repeats + 1):  # the first round warms up (capture, verification)
            for name, pipe in pipes.items():
                t0 = time.thread_time()
                with torch.no_grad():
                    pipe(labels, latents=latents, num_inference_steps=args.steps, guidance_scale=kind.guidance,
                         output_type="pt")
                if rep:
                    times[name].append(time.thread_time() - t0)
        med = {name: statistics.median(v) for name, v in times.items()}
        stats = pipes["stack"].tcpade.stats
        ideal = len(stats.records) / stats.computed
        assert pipes["modules"].tcpade.stats.decisions() == stats.decisions(), "the two forecasts' plans differ"
        print(f"| {width} ({4 * width}) | {args.layers} | {med['full']:.2f} | {med['full'] / med['stack']:.2f}x "
              f"({100 * med['full'] / med['stack'] / ideal:.0f} %) | {med['full'] / med['modules']:.2f}x "
              f"({100 * med['full'] / med['modules'] / ideal:.0f} %) | {ideal:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
