"""The weight-free diffusion maths, checked with stand-in noise predictors."""

import math

import pytest
import torch

from edge import diffusion


@pytest.fixture(scope="module")
def alpha_bar():
    return diffusion.alpha_bar_schedule(1000, 1e-4, 0.02)


def test_linear_schedule_values(alpha_bar):
    betas = diffusion.linear_betas(1000, 1e-4, 0.02)
    assert float(betas[0]) == pytest.approx(1e-4)
    assert float(betas[-1]) == pytest.approx(0.02)
    # Values computed by hand from prod(1 - beta) (research/model-anchors.md, section 1.2).
    assert float(alpha_bar[200]) == pytest.approx(0.656, abs=1e-3)
    assert float(alpha_bar[400]) == pytest.approx(0.194, abs=1e-3)
    assert float(alpha_bar[999]) == pytest.approx(4.0e-5, abs=1e-5)


def test_one_step_prediction_with_the_true_noise_returns_x0(alpha_bar):
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 8, 8, generator=generator) * 1.8 - 0.9
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.tensor([0.0, 200.0, 400.0, 900.0])
    x_t = diffusion.q_sample(x0, t, noise, alpha_bar.float())
    recovered = diffusion.predict_x0(x_t, t, noise, alpha_bar.float(), clamp=False)
    assert torch.allclose(recovered, x0, atol=1e-4)


def test_forward_noising_matches_the_closed_form(alpha_bar):
    x0 = torch.full((1, 1, 2, 2), 0.5)
    noise = torch.full((1, 1, 2, 2), -1.0)
    x_t = diffusion.q_sample(x0, torch.tensor([200.0]), noise, alpha_bar)
    a = float(alpha_bar[200])
    assert torch.allclose(x_t, torch.full_like(x0, math.sqrt(a) * 0.5 - math.sqrt(1 - a)))


def test_norm_guided_estimate_is_the_closed_form_blend(alpha_bar):
    # A stand-in noise predictor: any fixed function of (x_t, t) will do.
    def eps_model(x_t, t):
        return torch.tanh(0.7 * x_t + 0.001 * t[:, None, None, None]) - 0.2

    schedule = alpha_bar.double()
    generator = torch.Generator().manual_seed(3)
    x0 = (torch.rand(3, 1, 16, 16, generator=generator, dtype=torch.float64) - 0.5) * 0.6
    noise_small = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    noise_large = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    t_small, t_large, w = torch.full((3,), 200.0), torch.full((3,), 400.0), 1.0
    guided, eps_small, eps_large = diffusion.norm_guided_reconstruction(
        eps_model, x0, t_small, t_large, noise_small, noise_large, w, schedule
    )
    x_small = diffusion.q_sample(x0, t_small, noise_small, schedule)
    x_large = diffusion.q_sample(x0, t_large, noise_large, schedule)
    x0_small = diffusion.predict_x0(x_small, t_small, eps_small, schedule, clamp=False)
    x0_large = diffusion.predict_x0(x_large, t_large, eps_large, schedule)
    lam = w * (1.0 - float(schedule[200]))
    blend = ((1 - lam) * x0_small + lam * x0_large).clamp(-1, 1)
    assert lam == pytest.approx(0.344, abs=1e-3)
    assert torch.allclose(guided, blend, atol=1e-5)
    # Two different passes really were made: the blend is not either estimate alone.
    assert (guided - x0_small.clamp(-1, 1)).abs().max() > 1e-3


def test_iterative_ddpm_with_an_oracle_predictor_returns_x0(alpha_bar):
    generator = torch.Generator().manual_seed(5)
    x0 = (torch.rand(2, 1, 4, 4, generator=generator) - 0.5) * 1.2
    schedule = alpha_bar.float()

    def oracle(x_t, t):
        a = schedule[t.long()].reshape(-1, 1, 1, 1)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    recon, steps = diffusion.ddpm_reconstruction(oracle, x0, 300, schedule, generator)
    assert steps == 301
    assert torch.allclose(recon, x0, atol=1e-3)
    _, partial = diffusion.ddpm_reconstruction(oracle, x0, 999, schedule, generator, 5)
    assert partial == 5
