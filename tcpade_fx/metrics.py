"""Image-quality metrics used by the demo and the benchmarks (images in [-1, 1], shape (B, C, H, W))."""

from __future__ import annotations

import numpy as np
import torch


def psnr(reference: torch.Tensor, images: torch.Tensor) -> float:
    """PSNR in dB over the whole batch, data range 2 ([-1, 1])."""
    mse = torch.mean((reference.double() - images.double()) ** 2).item()
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)


def ssim(reference: torch.Tensor, images: torch.Tensor) -> float:
    """Mean SSIM over the batch (scikit-image, data range 2); images (B, C, H, W), channels averaged when C > 1."""
    from skimage.metrics import structural_similarity

    ref, img = reference.double().cpu().numpy(), images.double().cpu().numpy()
    if ref.shape[1] == 1:
        return float(np.mean([structural_similarity(r[0], i[0], data_range=2.0) for r, i in zip(ref, img)]))
    return float(np.mean([structural_similarity(r, i, data_range=2.0, channel_axis=0) for r, i in zip(ref, img)]))


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussian fits of two feature sets (compare only at equal sample counts)."""
    from scipy import linalg

    a, b = feats_a.double().cpu().numpy(), feats_b.double().cpu().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def kernel_inception_distance(feats_a: torch.Tensor, feats_b: torch.Tensor, subsets: int = 10, size: int = 200,
                              seed: int = 0) -> float:
    """KID (unbiased MMD² with the cubic polynomial kernel), averaged over random subsets.

    Both feature sets are divided by the RMS magnitude of ``feats_a`` (the reference set) times √d first: the
    classifier's post-ReLU features are much larger than the Inception features the kernel ``(x·y/d + 1)³`` was
    designed for, and unscaled they make the estimator's variance swamp the distance.
    """
    a, b = feats_a.double(), feats_b.double()
    d = a.shape[1]
    scale = a.pow(2).mean().sqrt().clamp_min(1e-12)
    a, b = a / scale, b / scale
    g = torch.Generator().manual_seed(seed)
    size = min(size, len(a), len(b))
    values = []
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=g)[:size]]
        y = b[torch.randperm(len(b), generator=g)[:size]]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        m = size
        values.append(
            ((kxx.sum() - kxx.diag().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diag().sum()) / (m * (m - 1))
             - 2 * kxy.mean()).item()
        )
    return float(np.mean(values))


def seeded_latents(seeds: list[int], shape=(1, 28, 28)) -> torch.Tensor:
    """One noise tensor per seed, so that any subset of seeds reproduces the same images."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
