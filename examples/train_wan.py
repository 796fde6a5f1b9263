"""Train ``mnist-wan`` (rectified flow on moving-digit clips, see tcpade_fx/models/wan.py), resumably.

    python examples/train_wan.py --minutes 80

Each step draws fresh clips (random seeds, random classes) from :class:`tcpade_fx.models.wan.MovingDigits`, a
logit-normal noise level per clip, time-shifted by --sigma-shift (Wan's flow shift; the bundled scheduler samples
with the same shift), and drops 10 % of the labels to the null class for classifier-free guidance; AdamW with a
linear warm-up (and, with --decay-from-minutes, a cosine decay over the rest of the time budget), gradient clipping
at 1, EMA 0.999 (as examples/train_mnist.py).

Checkpoints go to runs/wan/ckpt.pt every few minutes (rerun the same command to resume, with a larger --minutes to
train on); the loss log is appended to runs/wan/training_log.csv as it goes (rewritten from the checkpoint on
resume, so it never holds steps the checkpoint lost). At the end — or with --export-only, from the last
checkpoint — the EMA weights are written in fp16 as a diffusers pipeline folder (default
tcpade_fx/models/weights/mnist-wan/) with the log as training_log.csv.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from diffusers import FlowMatchEulerDiscreteScheduler

from tcpade_fx.models import mnist, wan

ROOT = Path(__file__).resolve().parents[1]
LOG_HEADER = ["step", "seconds", "ema_loss", "lr", "sigma_shift"]


def write_log(path: Path, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(LOG_HEADER)
        w.writerows(rows)


def shifted(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The time shift of SD3 / Wan (``FlowMatchEulerDiscreteScheduler(shift=...)``): σ → s·σ / (1 + (s - 1)·σ)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def export(ema: dict, log: list, out_dir: Path, sigma_shift: float) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    modules = {k: copy.deepcopy(m).to(torch.float16) for k, m in ema.items()}
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=sigma_shift)
    pipe = wan.MNISTWanPipeline(scheduler=scheduler, **modules)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    write_log(out_dir / "training_log.csv", log)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=80.0, help="total training wall-clock budget (over resumes)")
    ap.add_argument("--batch", type=int, default=32, help="clips per step")
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--decay-from-minutes", type=float, default=None,
                    help="from this much training time on, cosine-decay the learning rate to 2 %% of --lr at --minutes")
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--sigma-shift", type=float, default=3.0,
                    help="train on shift(σ) with σ logit-normal, and sample with the same scheduler shift (Wan's "
                         "flow shift): 8 frames of one digit keep their layout visible to a higher noise level than "
                         "one image, so the decisions (class, shape, track) happen at larger σ")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "wan")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "tcpade_fx" / "models" / "weights" / "mnist-wan")
    ap.add_argument("--export-only", action="store_true", help="write the pipeline from the last checkpoint and exit")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    args.run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.run_dir / "ckpt.pt"
    log_path = args.run_dir / "training_log.csv"

    modules = {"transformer": wan.mnist_wan_transformer(), "class_encoder": wan.mnist_wan_class_encoder()}
    params = [p for m in modules.values() for p in m.parameters()]
    ema = {k: copy.deepcopy(m).requires_grad_(False) for k, m in modules.items()}
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    step, elapsed, log, running = 0, 0.0, [], None
    data_rng = np.random.default_rng(args.seed)
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        for k in modules:
            modules[k].load_state_dict(ck["model"][k])
            ema[k].load_state_dict(ck["ema"][k])
        opt.load_state_dict(ck["opt"])
        step, elapsed, log = ck["step"], ck["elapsed"], ck["log"]
        torch.set_rng_state(ck["rng"])
        data_rng.bit_generator.state = ck["data_rng"]
        running = ck.get("running")
        log = [tuple(row) + (1.0,) if len(row) == 4 else tuple(row) for row in log]  # rows before --sigma-shift
        print(f"resumed at step {step}, {elapsed / 60:.1f} min", flush=True)
    elif args.export_only:
        raise SystemExit(f"no checkpoint at {ckpt_path}")
    if args.export_only:
        export(ema, log, args.out_dir, args.sigma_shift)
        print(f"exported EMA weights of step {step} to {args.out_dir}")
        return
    write_log(log_path, log)  # drops any rows written after the checkpoint we resumed from
    data = wan.MovingDigits()
    for m in modules.values():
        m.train()
    print(f"transformer {sum(p.numel() for p in modules['transformer'].parameters()) / 1e6:.3f} M parameters, "
          f"{wan.NUM_FRAMES} frames x 49 tokens", flush=True)

    def save_ckpt():
        torch.save(
            {
                "model": {k: m.state_dict() for k, m in modules.items()},
                "ema": {k: m.state_dict() for k, m in ema.items()},
                "opt": opt.state_dict(),
                "step": step,
                "elapsed": elapsed,
                "log": log,
                "rng": torch.get_rng_state(),
                "data_rng": data_rng.bit_generator.state,
                "running": running,
                "args": vars(args),
            },
            str(ckpt_path) + ".tmp",
        )
        os.replace(str(ckpt_path) + ".tmp", ckpt_path)

    budget = args.minutes * 60
    t0, last_ckpt = time.time() - elapsed, time.time()
    while elapsed < budget:
        seeds = data_rng.integers(0, 2**62, size=args.batch)
        y = torch.from_numpy(data_rng.integers(0, mnist.NUM_CLASSES, size=args.batch))
        x0 = data.clips(seeds.tolist(), y.tolist())
        y = torch.where(torch.rand(y.shape) < 0.1, torch.full_like(y, mnist.NULL_CLASS), y)  # CFG label dropout
        sigma = shifted(torch.sigmoid(torch.randn(args.batch)), args.sigma_shift)  # shifted logit-normal
        noise = torch.randn_like(x0)
        s = sigma.view(-1, 1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        pred = wan.velocity_wan(modules["transformer"], modules["class_encoder"], x_t, sigma, y)
        loss = torch.nn.functional.mse_loss(pred, noise - x0)
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        if args.decay_from_minutes is not None and elapsed > args.decay_from_minutes * 60:
            start = args.decay_from_minutes * 60
            frac = min(1.0, (elapsed - start) / max(budget - start, 1.0))
            lr = args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for k in modules:
                for pe, pm in zip(ema[k].parameters(), modules[k].parameters()):
                    pe.lerp_(pm, 1 - decay)
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        elapsed = time.time() - t0
        if step % 50 == 0:
            row = (step, round(elapsed, 1), round(running, 5), f"{lr:.3g}", args.sigma_shift)
            log.append(row)
            with open(log_path, "a", newline="") as f:
                csv.writer(f).writerow(row)
            print(f"step {step} min {elapsed / 60:.1f} loss {running:.4f}", flush=True)
        if time.time() - last_ckpt > 180:
            save_ckpt()
            last_ckpt = time.time()
    save_ckpt()
    export(ema, log, args.out_dir, args.sigma_shift)
    print(f"saved EMA weights after {step} steps ({elapsed / 60:.1f} min) to {args.out_dir}", flush=True)


if __name__ == "__main__":
    main()
