"""Diffusion maths of Diff-Fastener. Holds no weights.

Images live in one value range everywhere: [-1, 1]. The schedule is DDPM's linear schedule
(Ho et al. 2020), and the one-step, norm-guided estimate is DiffusionAD's
(Zhang et al., arXiv 2303.08730, section 3.3), which the Diff-Fastener paper adopts (section 3.3).

Notation follows the papers: ``alpha_bar[t]`` is the cumulative product of ``1 - beta``;
``x_t = sqrt(alpha_bar[t]) * x0 + sqrt(1 - alpha_bar[t]) * eps`` is the forward process.
Timesteps are integer-valued float tensors indexing ``0 .. T-1``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

NoisePredictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``eps_model(x_t, t)``: predicts the noise in ``x_t``; ``t`` has shape ``(batch,)``."""


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
    """DDPM's linear beta schedule, rescaled for ``T != 1000`` as in DDPM's code.

    Returns:
        float64 tensor of shape ``(T,)``.
    """
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64)


def alpha_bar_schedule(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
    """Cumulative products ``alpha_bar[t] = prod_{s<=t} (1 - beta_s)``; float64, shape ``(T,)``."""
    return torch.cumprod(1.0 - linear_betas(num_timesteps, beta_start, beta_end), dim=0)


def _at(alpha_bar: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``alpha_bar[t]`` shaped ``(batch, 1, 1, 1)`` in the dtype of ``like``."""
    values = alpha_bar.to(like.device)[t.long()]
    return values.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def q_sample(x0, t, noise, alpha_bar):
    """Forward process (DDPM eq. 4): noise ``x0`` to timestep ``t`` in one jump.

    Args:
        x0: clean images, ``(batch, channels, height, width)`` in [-1, 1].
        t: timesteps, ``(batch,)``.
        noise: standard normal noise of the shape of ``x0`` (or broadcastable to it).
        alpha_bar: the schedule, ``(T,)``.
    Returns:
        ``x_t`` of the shape of ``x0``.
    """
    a = _at(alpha_bar, t, x0)
    return a.sqrt() * x0 + (1.0 - a).sqrt() * noise


def predict_x0(x_t, t, eps, alpha_bar, clamp: bool = True):
    """One-step estimate of ``x0`` from ``x_t`` and predicted noise (DDPM eq. 15).

    ``x0 = (x_t - sqrt(1 - alpha_bar) * eps) / sqrt(alpha_bar)``, clamped to [-1, 1] when
    ``clamp``. Shapes as :func:`q_sample`.
    """
    a = _at(alpha_bar, t, x_t)
    x0 = (x_t - (1.0 - a).sqrt() * eps) / a.sqrt()
    return x0.clamp(-1.0, 1.0) if clamp else x0


def norm_guided_x0(x_small, t_small, eps_small, x0_large, w, alpha_bar, clamp: bool = True):
    """Norm-guided one-step estimate (DiffusionAD section 3.3; Diff-Fastener section 3.3).

    The reconstruction from the large timestep guides the denoising at the small one:

    1. re-noise the large-scale estimate to ``t_small`` with the *predicted* small-scale noise:
       ``x_tilde = sqrt(a_s) * x0_large + sqrt(1 - a_s) * eps_small``;
    2. guide the noise: ``eps_star = eps_small - w * sqrt(1 - a_s) * (x_tilde - x_small)``;
    3. estimate ``x0`` from ``x_small`` with ``eps_star``.

    Algebraically this is the blend ``(1 - lam) * x0_small + lam * x0_large`` with
    ``lam = w * (1 - a_s)``, ``x0_small`` being the unclamped one-step estimate at ``t_small``.

    Args:
        x_small: the crop noised to ``t_small``, ``(batch, channels, height, width)``.
        t_small: ``(batch,)``.
        eps_small: noise predicted from ``x_small``, shape of ``x_small``.
        x0_large: one-step estimate from the large timestep, shape of ``x_small``.
        w: guidance weight (a float, or a tensor broadcastable to ``(batch, 1, 1, 1)``).
        alpha_bar: the schedule, ``(T,)``.
    Returns:
        the guided ``x0`` estimate, shape of ``x_small``.
    """
    a = _at(alpha_bar, t_small, x_small)
    x_tilde = a.sqrt() * x0_large + (1.0 - a).sqrt() * eps_small
    eps_star = eps_small - w * (1.0 - a).sqrt() * (x_tilde - x_small)
    return predict_x0(x_small, t_small, eps_star, alpha_bar, clamp=clamp)


def norm_guided_reconstruction(
    eps_model: NoisePredictor,
    x0,
    t_small,
    t_large,
    noise_small,
    noise_large,
    w,
    alpha_bar,
):
    """Both one-step passes, run as one batch of ``2 * batch``, and the guided blend.

    Args:
        eps_model: the noise predictor.
        x0: crops in [-1, 1], ``(batch, channels, height, width)``.
        t_small, t_large: ``(batch,)`` timesteps.
        noise_small, noise_large: noise broadcastable to ``x0``.
    Returns:
        ``(x0_guided, eps_small, eps_large)``: the guided reconstruction and the two noise
        predictions (the training loss needs them), each of the shape of ``x0``.
    """
    batch = x0.shape[0]
    x_small = q_sample(x0, t_small, noise_small, alpha_bar)
    x_large = q_sample(x0, t_large, noise_large, alpha_bar)
    eps = eps_model(torch.cat([x_small, x_large]), torch.cat([t_small, t_large]))
    eps_small, eps_large = eps[:batch], eps[batch:]
    x0_large = predict_x0(x_large, t_large, eps_large, alpha_bar)
    x0_guided = norm_guided_x0(x_small, t_small, eps_small, x0_large, w, alpha_bar)
    return x0_guided, eps_small, eps_large


@torch.no_grad()
def ddpm_reconstruction(
    eps_model: NoisePredictor,
    x0,
    t_start: int,
    alpha_bar,
    generator: torch.Generator | None = None,
    num_steps: int | None = None,
):
    """Iterative DDPM reconstruction: noise ``x0`` to ``t_start``, then denoise step by step.

    This is what one-step denoising replaces; it exists to measure what one-step saves.
    Ancestral sampling (DDPM eq. 11 with ``sigma_t^2 = beta_t``).

    Args:
        eps_model: the noise predictor.
        x0: crops in [-1, 1], ``(batch, channels, height, width)``.
        t_start: first timestep (``T - 1`` samples from pure noise).
        alpha_bar: the schedule, ``(T,)``.
        generator: source of the sampling noise.
        num_steps: stop after this many denoising steps (for timing; the result is then
            partial). ``None`` runs all ``t_start + 1`` steps.
    Returns:
        ``(x, steps_run)``: the reconstruction, shape of ``x0``, and the number of network
        evaluations made.
    """
    alpha_bar = alpha_bar.to(x0.device)
    alphas = torch.ones_like(alpha_bar)
    alphas[1:] = alpha_bar[1:] / alpha_bar[:-1]
    alphas[0] = alpha_bar[0]
    batch = x0.shape[0]

    def noise_like(x):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)

    t0 = torch.full((batch,), float(t_start), device=x0.device)
    x = q_sample(x0, t0, noise_like(x0), alpha_bar)
    steps_run = 0
    for step in range(t_start, -1, -1):
        if num_steps is not None and steps_run >= num_steps:
            break
        t = torch.full((batch,), float(step), device=x0.device)
        eps = eps_model(x, t)
        alpha_t = alphas[step].to(x.dtype)
        a_bar_t = alpha_bar[step].to(x.dtype)
        mean = (x - (1 - alpha_t) / (1 - a_bar_t).sqrt() * eps) / alpha_t.sqrt()
        x = mean + (1 - alpha_t).sqrt() * noise_like(x) if step > 0 else mean
        steps_run += 1
    return x.clamp(-1.0, 1.0), steps_run
