"""Building blocks shared by the two networks: time embedding, residual and attention blocks.

The layout follows the ADM U-Net that DiffusionAD uses (Dhariwal & Nichol 2021), with the
Diff-Fastener change that every activation is GELU (paper section 3.4).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter, so a residual branch starts as a no-op."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype.

    Its variance squares activations, which overflows float16 above about 256 (FP16 engines
    turn that into NaN); computing it in float32 is what the engine build keeps as well.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a float timestep (Vaswani et al. 2017, section 3.5).

    ``t`` is cast to float32 first: an integer timestep exports to an ONNX graph whose Cos/Sin
    nodes ONNX Runtime rejects (research/perf-anchors.md, B5).

    Args:
        t: timesteps, ``(batch,)``.
        dim: embedding width (even).
    Returns:
        ``(batch, dim)``: ``[cos(t * f_i), sin(t * f_i)]``.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) / half
    frequencies = torch.exp(-math.log(max_period) * exponent)
    angles = t.float()[:, None] * frequencies[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class ResBlock(nn.Module):
    """Residual block conditioned on the time embedding, optionally resampling.

    ``h = conv(act(norm(x)))``, plus a per-channel bias from the time embedding, then
    ``conv(dropout(act(norm(h))))`` with the last convolution zero-initialised; the shortcut is
    the identity or a 1x1 convolution when the width changes. With ``down``/``up`` both paths are
    average-pooled or nearest-upsampled by 2 (BigGAN-style resampling, as in DiffusionAD).

    Shapes: ``x (batch, in_ch, h, w)``, ``emb (batch, emb_dim)`` ->
    ``(batch, out_ch, h', w')`` with ``h' = h/2`` (down), ``2h`` (up) or ``h``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        norm_groups: int,
        dropout: float = 0.0,
        down: bool = False,
        up: bool = False,
    ):
        super().__init__()
        self.down, self.up = down, up
        self.in_norm = GroupNorm32(norm_groups, in_channels)
        self.in_conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels)
        self.out_norm = GroupNorm32(norm_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.shortcut = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Conv2d(in_channels, out_channels, 1)
        )

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            return F.avg_pool2d(x, 2)
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.in_norm(x))
        h = self.in_conv(self._resample(h))
        x = self._resample(x)
        h = h + self.emb_proj(F.gelu(emb))[:, :, None, None]
        h = self.out_conv(self.dropout(F.gelu(self.out_norm(h))))
        return self.shortcut(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, residual.

    The softmax is computed in float32 (it overflows float16 on large logits). Written with
    plain matrix products rather than a fused kernel so that it exports to ONNX opset 17 and
    TensorRT without special handling.

    Shapes: ``(batch, channels, h, w)`` -> same.
    """

    def __init__(self, channels: int, num_heads: int, norm_groups: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = GroupNorm32(norm_groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        head_dim = channels // self.num_heads
        qkv = self.qkv(self.norm(x).reshape(batch, channels, height * width))
        # (batch * heads, 3 * head_dim, pixels) -> three (batch * heads, head_dim, pixels)
        q, k, v = qkv.reshape(batch * self.num_heads, 3 * head_dim, height * width).chunk(3, 1)
        scale = head_dim**-0.25
        logits = torch.bmm((q * scale).transpose(1, 2), k * scale)  # (b*h, pixels, pixels)
        weights = torch.softmax(logits.float(), dim=-1).to(v.dtype)
        out = torch.bmm(v, weights.transpose(1, 2))  # (b*h, head_dim, pixels)
        out = self.proj(out.reshape(batch, channels, height * width))
        return x + out.reshape(batch, channels, height, width)
