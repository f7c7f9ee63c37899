"""The segmentation network: a plain U-Net from (crop, reconstruction) to an anomaly map.

DiffusionAD's segmentation sub-network is a six-level U-Net of double 3x3 convolutions with
skip connections (research/model-anchors.md, summary point 3). Here normalisation is GroupNorm
rather than BatchNorm: training batches are small (half of them synthetic anomalies), DDP ranks
would otherwise keep different running statistics, and a crop must score the same alone or in a
batch. Activations are GELU, as in the rest of Diff-Fastener.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from edge.model.config import ModelConfig


def _groups(channels: int, norm_groups: int) -> int:
    """The largest group count not above ``norm_groups`` that divides ``channels``."""
    groups = min(norm_groups, channels)
    while channels % groups:
        groups -= 1
    return groups


class DoubleConv(nn.Sequential):
    """``(conv3x3 -> GroupNorm -> GELU) x 2``. ``(batch, in, h, w) -> (batch, out, h, w)``."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int):
        groups = _groups(out_channels, norm_groups)
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.GroupNorm(groups, out_channels),
            nn.GELU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.GroupNorm(groups, out_channels),
            nn.GELU(),
        )


class SegmentationUNet(nn.Module):
    """``(batch, 2C, H, W)`` (crop and reconstruction, concatenated) -> ``(batch, 1, H, W)``.

    The output is a per-pixel anomaly probability in [0, 1] (sigmoid).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        cfg = config.segmenter
        widths = [cfg.base_channels * mult for mult in cfg.channel_mults]
        self.encoder = nn.ModuleList()
        channels = 2 * config.in_channels
        for width in widths:
            self.encoder.append(DoubleConv(channels, width, cfg.norm_groups))
            channels = width
        self.up_convs = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.up_convs.append(
                nn.Sequential(
                    nn.Conv2d(channels, width, 3, padding=1),
                    nn.GroupNorm(_groups(width, cfg.norm_groups), width),
                    nn.GELU(),
                )
            )
            self.decoder.append(DoubleConv(2 * width, width, cfg.norm_groups))
            channels = width
        self.head = nn.Conv2d(channels, 1, 3, padding=1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid map, ``(batch, 1, H, W)``; the training loss works on these."""
        skips = []
        for index, block in enumerate(self.encoder):
            if index:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        skips.pop()
        for up_conv, block in zip(self.up_convs, self.decoder):
            x = up_conv(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))
            x = block(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))
