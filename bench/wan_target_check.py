#!/usr/bin/env python
"""Usage: python bench/wan_target_check.py (about 15 min on one core). mnist-wan, 100 clips (the benchmark's seeds 0..99 and latents): TC-Padé balanced vs fewer steps at equal compute."""
import json, sys
from pathlib import Path

import torch
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench")); sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)
import tcpade_fx
from tcpade_fx import models, metrics
from benchmark import euler, unipc, VideoSamples
kind = VideoSamples()
seeds = list(range(100)); labels = [s % 10 for s in seeds]
lat = metrics.seeded_latents(seeds, kind.latent_shape)
def run(pipe, n):
    out = []
    for i in range(0, 100, 25):
        out.append(pipe(labels[i:i+25], latents=lat[i:i+25], num_inference_steps=n, guidance_scale=kind.guidance, output_type="pt").frames)
    return torch.cat(out)
res = {}
for n, few in [(20, 8), (28, 12)]:
    pf = models.load("mnist-wan"); pf.scheduler = euler(); full = run(pf, n)
    for name, sched, steps, pol in [("TC-Padé balanced", euler, n, "balanced"), (f"fewer steps UniPC ({few})", unipc, few, None),
                                    (f"fewer steps Euler ({few})", euler, few, None)]:
        p = models.load("mnist-wan"); p.scheduler = sched()
        if pol: tcpade_fx.compile(p, policy=pol)
        x = run(p, steps)
        res[f"{n} {name}"] = round(metrics.psnr(full, x), 2)
        print(n, name, res[f"{n} {name}"], flush=True)
print(json.dumps(res))
