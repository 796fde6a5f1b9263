"""How to turn the observed Padé-vs-Taylor evidence into the modulation μ: the variants compared before choosing
the running average of the least-squares fit (Policy.modulation_smoothing = 0.5). bench/MODULATION_STUDY.md
quotes its output.

    python bench/modulation_variants.py off,fit,ema0.5,sel1,sel0.5,batch \
        mnist-flux:28:0.40,mnist-flux:28:0.35,mnist-flux:50:0.35,mnist-dit:20:0.40,mnist-dit:28:0.40,mnist-dit:50:0.35

Variants (after each computed step, from P and T, the Padé and Taylor predictions of the residual just computed):
``off`` μ = 1 (plain Padé); ``fit`` the least-squares μ of the newest step alone; ``emaA`` its running average with
weight A on the newest; ``selA`` μ ∈ {0, 1} by the sign of a running average (weight A) of log(e_T / e_P); ``batch``
one least-squares μ for the whole batch. Cells are model:steps:budget of the "balanced" plan; 48 seeds (1000..),
PSNR against the full run. The runtime's own step is replaced for the experiment (a study, not the library path).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tcpade_fx  # noqa: E402
from tcpade_fx import Policy, metrics, models  # noqa: E402
from tcpade_fx import runtime as rt  # noqa: E402
from tcpade_fx.pade import _flatten, extrapolate_stacked, fit_modulation  # noqa: E402

MODE = {"m": "fit"}


def check(self, branch, residual, time, order):
    """Stands in for TCPadeRuntime._check_and_modulate with the variant MODE["m"]."""
    p = self.policy
    kw = dict(like=branch.residuals[-1], order=order, eps=p.eps, pole_margin=p.pole_margin)
    P = extrapolate_stacked(branch.times, branch.stacked, time, method="pade", **kw)
    T = extrapolate_stacked(branch.times, branch.stacked, time, method="taylor", **kw)
    mu = torch.as_tensor(branch.modulation, dtype=torch.float32)
    pred = T + mu.reshape(-1, *[1] * (T.dim() - 1)) * (P - T)
    m = MODE["m"]
    if m == "fit":
        branch.modulation = fit_modulation(residual, P, T, default=mu)
    elif m.startswith("ema"):
        a = float(m[3:])
        branch.modulation = a * fit_modulation(residual, P, T, default=mu) + (1 - a) * mu
    elif m.startswith("sel"):  # select by running error ratio
        a = float(m[3:])
        A = _flatten(residual, True)
        e_pade = (A - _flatten(P, True)).norm(dim=1)
        e_taylor = (A - _flatten(T, True)).norm(dim=1)
        s = getattr(branch, "score", None)
        r = torch.log(e_taylor + 1e-12) - torch.log(e_pade + 1e-12)  # >0: Padé better
        s = r if s is None else a * r + (1 - a) * s
        branch.score = s
        if not torch.equal(P, T):
            branch.modulation = (s > 0).float()
    elif m == "batch":  # one μ for the batch
        f = fit_modulation(residual, P, T, per_sample=False, default=float(mu.mean()))
        branch.modulation = f.expand(residual.shape[0]).clone()
    return pred


def main() -> None:
    torch.set_num_threads(1)
    if not hasattr(rt.TCPadeRuntime, "_check_and_modulate"):
        raise SystemExit(
            "bench/modulation_variants.py replaces TCPadeRuntime._check_and_modulate, which the runtime no longer has "
            "(since issue 12 the check is split into per-process shares, _check_partials, and a finish, "
            "_finish_check). Its results (bench/MODULATION_STUDY.md) were measured before; to rerun it, check out "
            "a commit before 3e8e547 or port `check` to _finish_check.")
    rt.TCPadeRuntime._check_and_modulate = check
    seeds = list(range(1000, 1048))
    labels = [s % 10 for s in seeds]
    lat = metrics.seeded_latents(seeds)
    modes = sys.argv[1].split(",")
    cells = [(a.split(":")[0], int(a.split(":")[1]), float(a.split(":")[2])) for a in sys.argv[2].split(",")]
    for model, n, budget in cells:
        pipe = models.load(model)
        full = pipe(labels, latents=lat, num_inference_steps=n, guidance_scale=1.5, output_type="pt").images
        row = []
        for m in modes:
            MODE["m"] = m
            pol = Policy.preset("balanced").replace(compute_budget=budget, modulate_denominator=(m != "off"))
            pipe = tcpade_fx.compile(models.load(model), policy=pol)
            im = pipe(labels, latents=lat, num_inference_steps=n, guidance_scale=1.5, output_type="pt").images
            row.append(f"{m}={metrics.psnr(full, im):.2f}")
        print(model, n, budget, " ".join(row), flush=True)


if __name__ == "__main__":
    main()
