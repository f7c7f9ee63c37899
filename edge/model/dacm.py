"""DACM, the dilated attention convolution module of Diff-Fastener (paper section 3.4, Fig. 5).

The paper states that DACM joins an attention module (CBAM, Woo et al. 2018) and a 3x3
convolution with dilation 2 and padding 2, with GELU, in the middle of the reconstruction
network. Its exact wiring (order, residual, normalisation) is not in the text we have; this
implementation is

    DACM(x) = x + gamma * GELU(GroupNorm(DilatedConv3x3(CBAM(x))))

with ``gamma`` a per-channel scale initialised to zero, so the block starts as the identity and
training begins from DiffusionAD's behaviour.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from edge.model.layers import GroupNorm32


class ChannelGate(nn.Module):
    """CBAM channel attention: a shared MLP (reduction 16) on global average and max pooling.

    Shapes: ``(batch, channels, h, w)`` -> same.
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(x.mean(dim=(2, 3)))
        peak = self.mlp(x.amax(dim=(2, 3)))
        return x * torch.sigmoid(avg + peak)[:, :, None, None]


class SpatialGate(nn.Module):
    """CBAM spatial attention: a 7x7 convolution over the channel max and mean maps.

    CBAM follows the convolution with BatchNorm; here the convolution keeps its bias instead.
    A one-channel BatchNorm adds batch statistics that differ between DDP ranks and between
    batch sizes at inference, and at inference it folds into exactly such a bias.

    Shapes: ``(batch, channels, h, w)`` -> same.
    """

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(pooled))


class DACM(nn.Module):
    """Dilated attention convolution module. Shapes: ``(batch, channels, h, w)`` -> same.

    The dilated convolution has explicit ``padding=dilation``: ``padding="same"`` exports with
    ``auto_pad``, which an ONNX optimiser once resolved from the undilated kernel and shrank the
    map (microsoft/onnxscript#3037).
    """

    def __init__(self, channels: int, norm_groups: int, dilation: int = 2, reduction: int = 16):
        super().__init__()
        self.channel_gate = ChannelGate(channels, reduction)
        self.spatial_gate = SpatialGate()
        self.dilated_conv = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation)
        self.norm = GroupNorm32(norm_groups, channels)
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.spatial_gate(self.channel_gate(x))
        h = F.gelu(self.norm(self.dilated_conv(h)))
        return x + self.gamma * h
