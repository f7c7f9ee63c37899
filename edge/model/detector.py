"""The Diff-Fastener detector: the one module the engines export and run.

Crops in, anomaly map and image score out. Everything the runtime needs is inside: input
normalisation, both one-step denoising passes (run as one batch), the norm-guided blend, the
segmentation pass and the top-k image score. The inference noise is fixed (a seeded buffer,
the same for every crop of a batch), so a crop always gets the same score, alone or in a batch,
in PyTorch, ONNX Runtime or TensorRT.
"""

from __future__ import annotations

import torch
from torch import nn

from edge import diffusion
from edge.model.config import ModelConfig
from edge.model.denoiser import NoiseUNet
from edge.model.segmenter import SegmentationUNet

PIXEL_MAX = 255.0
"""Crops enter the model in 8-bit units, ``[0, 255]`` as float32, whatever the camera's depth."""


def to_unit_range(crops: torch.Tensor) -> torch.Tensor:
    """Pixel units ``[0, 255]`` -> the model's value range ``[-1, 1]``. Shape unchanged."""
    return crops * (2.0 / PIXEL_MAX) - 1.0


def to_pixel_range(x: torch.Tensor) -> torch.Tensor:
    """The model's ``[-1, 1]`` -> pixel units ``[0, 255]``. Shape unchanged."""
    return (x + 1.0) * (PIXEL_MAX / 2.0)


class DiffFastener(nn.Module):
    """Reconstruction network, segmentation network and the weight-free maths joining them."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.denoiser = NoiseUNet(config)
        self.segmenter = SegmentationUNet(config)
        dcfg = config.diffusion
        alpha_bar = diffusion.alpha_bar_schedule(dcfg.num_timesteps, dcfg.beta_start, dcfg.beta_end)
        self.register_buffer("alpha_bar", alpha_bar.float(), persistent=False)
        shape = (1, config.in_channels, config.image_size, config.image_size)
        generator = torch.Generator().manual_seed(config.noise_seed)
        self.register_buffer("noise_small", torch.randn(shape, generator=generator))
        self.register_buffer("noise_large", torch.randn(shape, generator=generator))

    def reconstruct(self, x0, t_small, t_large, noise_small, noise_large):
        """Norm-guided one-step reconstruction in ``[-1, 1]``.

        Args:
            x0: crops in ``[-1, 1]``, ``(batch, C, H, W)``.
            t_small, t_large: ``(batch,)`` float timesteps.
            noise_small, noise_large: broadcastable to ``x0``.
        Returns:
            ``(x0_guided, eps_small, eps_large)``, each ``(batch, C, H, W)``.
        """
        return diffusion.norm_guided_reconstruction(
            self.denoiser,
            x0,
            t_small,
            t_large,
            noise_small,
            noise_large,
            self.config.diffusion.guidance_w,
            self.alpha_bar,
        )

    def image_score(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """Mean of the top-k values of each map: ``(batch, 1, H, W) -> (batch,)``."""
        flat = anomaly_map.flatten(1)
        return torch.topk(flat, self.config.top_k, dim=1).values.mean(dim=1)

    def forward(self, crops: torch.Tensor):
        """Score crops.

        Args:
            crops: float32 ``(batch, C, H, W)`` in pixel units ``[0, 255]``.
        Returns:
            ``(anomaly_map, image_score, reconstruction)``: ``(batch, 1, H, W)`` in ``[0, 1]``,
            ``(batch,)``, and ``(batch, C, H, W)`` in pixel units.
        """
        x0 = to_unit_range(crops)
        batch = x0.shape[0]
        dcfg = self.config.diffusion
        ones = torch.ones(batch, dtype=x0.dtype, device=x0.device)
        x0_guided, _, _ = self.reconstruct(
            x0, ones * dcfg.t_small, ones * dcfg.t_large, self.noise_small, self.noise_large
        )
        anomaly_map = self.segmenter(torch.cat([x0, x0_guided], dim=1))
        return anomaly_map, self.image_score(anomaly_map), to_pixel_range(x0_guided)
