"""Quality tests on the bundled trained models: readable digits of the asked class, and TC-Padé faithful to the
full run (better than simply running fewer steps at the same number of block-stack evaluations)."""

import pytest
import torch

import tcpade_fx
from tcpade_fx import metrics, models
from tcpade_fx.models.classifier import load_classifier

SEEDS = list(range(20))
LABELS = [s % 10 for s in SEEDS]
STEPS = 20


@pytest.fixture(scope="module")
def latents():
    return metrics.seeded_latents(SEEDS)


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def sample(pipe, latents, steps=STEPS):
    return pipe(LABELS, latents=latents, num_inference_steps=steps, guidance_scale=1.5, output_type="pt").images


@pytest.mark.parametrize("name", ["mnist-dit", "mnist-flux", "mnist-dit-heldout"])
def test_bundled_model_draws_the_asked_digits(name, latents, classifier):
    images = sample(models.load(name), latents)
    assert images.shape == (len(SEEDS), 1, 28, 28)
    with torch.no_grad():
        predicted = classifier(images).argmax(dim=1)
    accuracy = (predicted == torch.tensor(LABELS)).float().mean().item()
    assert accuracy >= 0.9, f"{name}: only {accuracy:.0%} of the samples are the asked digit"


@pytest.mark.parametrize("name", ["mnist-dit", "mnist-flux", "mnist-dit-heldout"])
def test_balanced_is_faithful_and_beats_fewer_steps_at_equal_compute(name, latents):
    full = sample(models.load(name), latents)
    pipe = tcpade_fx.compile(models.load(name), policy="balanced")
    cached = sample(pipe, latents)
    computed_steps = pipe.tcpade.stats.decisions(0).count("C")
    assert computed_steps < STEPS / 2
    fewer = sample(models.load(name), latents, steps=computed_steps)
    cached_psnr, fewer_psnr = metrics.psnr(full, cached), metrics.psnr(full, fewer)
    assert cached_psnr >= 30.0, f"{name}: balanced only {cached_psnr:.1f} dB from the full run"
    assert cached_psnr > fewer_psnr + 2.0, (
        f"{name}: balanced ({computed_steps} computed steps) {cached_psnr:.1f} dB vs {computed_steps} plain steps "
        f"{fewer_psnr:.1f} dB"
    )


def test_the_fitted_modulation_moves_the_predictions(latents):
    """After each computed step μ is fitted per sample and the following predictions use it: within [0, 1], not
    stuck at 1 (plain Padé, which is what modulate_denominator=False predicts with)."""
    policy = tcpade_fx.Policy.preset("balanced")
    on = tcpade_fx.compile(models.load("mnist-dit"), policy=policy)
    off = tcpade_fx.compile(models.load("mnist-dit"), policy=policy.replace(modulate_denominator=False))
    modulated, plain = sample(on, latents), sample(off, latents)
    mus = [r.modulation for r in on.tcpade.stats.records if not r.computed]
    assert mus and all(0.0 <= m <= 1.0 for m in mus) and min(mus) < 0.95, mus
    assert all(r.modulation is None for r in off.tcpade.stats.records)
    assert not torch.equal(modulated, plain)


def test_a_list_of_generators_seeds_each_image(latents):
    pipe = models.load("mnist-dit")
    both = pipe([3, 7], generator=[torch.Generator().manual_seed(s) for s in (5, 6)], num_inference_steps=4,
                output_type="pt").images
    alone = pipe([7], generator=torch.Generator().manual_seed(6), num_inference_steps=4, output_type="pt").images
    torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one per image"):
        pipe([3, 7], generator=[torch.Generator()], num_inference_steps=2)


def test_bfloat16_timesteps_keep_every_step_apart(latents):
    # mnist-dit in bfloat16 receives σ·1000 in bfloat16: at 300 steps consecutive values round to the same number
    # (a step taken for a second guidance branch) and the gaps the extrapolation weighs are distorted by up to 40 %
    pipe = models.load("mnist-dit").to(torch.bfloat16)
    tcpade_fx.compile(pipe, "balanced")
    steps = 300
    pipe([3], latents=latents[:1], num_inference_steps=steps, guidance_scale=1.5, output_type="pt")
    records = pipe.tcpade.stats.records
    assert [r.step for r in records] == list(range(steps)) and {r.branch for r in records} == {0}
    sigmas = pipe.scheduler.sigmas[:steps].double()
    times = torch.tensor([r.time for r in records], dtype=torch.float64)
    assert torch.allclose(times / sigmas, times[:1] / sigmas[:1], rtol=1e-6)  # the scheduler's grid, exactly
    assert records[-1].computed


def test_a_time_shifted_schedule_flattens_the_budget_plan(latents):
    """The scheduler's step lengths reach the plan: at Wan / SD3's time shift 3 (short early steps, long late ones)
    "balanced" flattens its warp (Policy.step_size_weight; at 20 steps down to the even plan's schedule), at
    shift 1 it plans as its warp says."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    def schedule(shift, **change):
        pipe = models.load("mnist-dit")
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        tcpade_fx.compile(pipe, policy=tcpade_fx.Policy.preset("balanced").replace(**change))
        pipe(LABELS[:2], latents=latents[:2], num_inference_steps=STEPS, guidance_scale=1.5, output_type="pt")
        return pipe.tcpade.stats.decisions(0)

    assert schedule(1.0) == schedule(1.0, step_size_weight=0.0)
    shifted = schedule(3.0)
    assert shifted != schedule(3.0, step_size_weight=0.0)
    assert shifted == schedule(3.0, budget_warp=1.0)
