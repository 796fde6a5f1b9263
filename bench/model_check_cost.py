"""What following model changes costs: one model fingerprint (tcpade_fx.model_state) per trajectory, against a
predict call (the cheapest transformer call a TC-Padé run makes), on FLUX.1-dev geometry.

    python bench/model_check_cost.py        # -> bench/MODEL_CHECK_COST.md

The fingerprint walks every parameter, buffer and submodule: its cost depends on how many there are, not on
their widths, so it is timed on FLUX.1-dev's structure (19 dual + 38 single blocks) at narrow widths, with and
without a rank-16 LoRA on the attention projections. The predict call (head and tail; the block stack is replaced)
depends on the widths, not on the depth, so it is timed at FLUX.1-dev's widths (hidden 3072, 24 heads, text 4096)
with 1 + 2 blocks, 256 image and 64 text tokens, float32, 1 thread (CPU: the only device here).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

import tcpade_fx
from tcpade_fx.model_state import model_fingerprint


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def flux(num_layers: int, num_single_layers: int, heads: int, head_dim: int, joint: int, pooled: int):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=num_layers,
                                  num_single_layers=num_single_layers, attention_head_dim=head_dim,
                                  num_attention_heads=heads, joint_attention_dim=joint, pooled_projection_dim=pooled,
                                  guidance_embeds=True, axes_dims_rope=(16, 56, 56) if head_dim == 128 else (4, 6, 6)
                                  ).eval()


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    deep = flux(19, 38, heads=2, head_dim=16, joint=32, pooled=16)
    n_tensors = sum(1 for _ in deep.parameters()) + sum(1 for _ in deep.buffers())
    n_modules = sum(1 for _ in deep.modules())
    plain_s = _median_s(lambda: model_fingerprint(deep), 20)
    from peft import LoraConfig

    deep.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    lora_tensors = sum(1 for _ in deep.parameters())
    lora_s = _median_s(lambda: model_fingerprint(deep), 20)

    wide = flux(1, 2, heads=24, head_dim=128, joint=4096, pooled=768)
    img, txt, batch = 256, 64, 1
    g = torch.Generator().manual_seed(0)
    kwargs = dict(
        hidden_states=torch.randn(batch, img, 64, generator=g), encoder_hidden_states=torch.randn(batch, txt, 4096, generator=g),
        pooled_projections=torch.randn(batch, 768, generator=g), timestep=torch.full((batch,), 0.5),
        guidance=torch.full((batch,), 3.5), img_ids=torch.zeros(img, 3), txt_ids=torch.zeros(txt, 3), return_dict=False,
    )
    with torch.no_grad():
        plain_forward_s = _median_s(lambda: wide(**kwargs), 3)
    tcpade_fx.compile(wide, "balanced")
    with torch.no_grad():
        wide(**kwargs)  # capture
        graphs = wide.tcpade.graphs
        leaves, _ = tcpade_fx.passes.flatten_call((), tcpade_fx.passes.bind_call(wide, (), kwargs), graphs.in_spec)
        *_, residual = graphs.compute(*leaves)
        predict_s = _median_s(lambda: graphs.predict(*leaves, residual), 5)
    lines = [
        "# Following model changes: what the check costs", "",
        "`python bench/model_check_cost.py` (torch " + torch.__version__ + ", CPU, 1 thread, medians).", "",
        "| what | seconds |", "|---|---|",
        f"| fingerprint, FLUX.1-dev structure ({n_tensors} tensors, {n_modules} modules) | {plain_s * 1e3:.2f} ms |",
        f"| fingerprint, same with a rank-16 LoRA on to_q/to_k/to_v/to_out ({lora_tensors} parameters) | "
        f"{lora_s * 1e3:.2f} ms |",
        f"| predict call, FLUX.1-dev widths, 1 + 2 blocks, {img} + {txt} tokens | {predict_s * 1e3:.1f} ms |",
        f"| full forward of that 3-block model (for scale) | {plain_forward_s * 1e3:.0f} ms |", "",
        f"One fingerprint (with the LoRA) is {100 * lora_s / predict_s:.1f} % of one predict call here, and it runs once "
        "per trajectory (at the scheduler's set_timesteps, or a bare transformer's new trajectory), not per call: over "
        f"a 28-step run that is {100 * lora_s / (28 * predict_s):.2f} % of 28 predict calls. On a GPU the predict call "
        "is faster and the fingerprint (pure Python) is not: not measured here (no GPU).",
    ]
    text = "\n".join(lines)
    print(text)
    Path(__file__).with_name("MODEL_CHECK_COST.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
