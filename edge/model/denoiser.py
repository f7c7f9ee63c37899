"""The reconstruction network: a residual U-Net that predicts the noise in ``x_t``.

ADM layout as in DiffusionAD (research/model-anchors.md, section 1.5) with Diff-Fastener's
changes: GELU activations, a DACM block in the middle stage, and Sparse-Skip connections.

Skips, level by level. At each resolution the encoder produces ``num_res_blocks + 1`` feature
maps of the same size (the stem or the downsampling block, then each residual block), and the
decoder has ``num_res_blocks + 1`` blocks. Dense skips (DiffusionAD, ``skip_stride=1``) pass
every one of them. Sparse-Skip (after DiC, Tian et al. CVPR 2025, whose wording the paper
follows) keeps one every ``skip_stride``: encoder map ``i`` is kept when
``(num_res_blocks - i) % skip_stride == 0`` (so the last map before downsampling always is) and
decoder block ``j`` concatenates one when ``j % skip_stride == 0`` (so the first block of each
level always does). Both rules select ``num_res_blocks // skip_stride + 1`` maps per level,
so pushes and pops match. With two residual blocks and stride 3, 18 concatenations of the
paper network become 6.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from edge.model.config import ModelConfig
from edge.model.dacm import DACM
from edge.model.layers import AttentionBlock, GroupNorm32, ResBlock, timestep_embedding, zero_module


def keeps_encoder_skip(index: int, num_res_blocks: int, stride: int) -> bool:
    """Whether encoder map ``index`` (0 = stem/downsample, then residual blocks) is a skip."""
    return (num_res_blocks - index) % stride == 0


def takes_decoder_skip(index: int, stride: int) -> bool:
    """Whether decoder block ``index`` of a level concatenates a skip."""
    return index % stride == 0


class Stage(nn.Module):
    """A residual block optionally followed by self-attention."""

    def __init__(self, block: ResBlock, attention: AttentionBlock | None):
        super().__init__()
        self.block = block
        self.attention = attention

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.block(x, emb)
        return self.attention(x) if self.attention is not None else x


class NoiseUNet(nn.Module):
    """Predicts the noise added to a crop. ``(x_t, t) -> eps``, both ``(batch, C, H, W)``.

    ``t`` is a float tensor of shape ``(batch,)``.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        cfg = config.denoiser
        base, groups, stride = cfg.base_channels, cfg.norm_groups, cfg.skip_stride
        nrb = cfg.num_res_blocks
        emb_dim = 4 * base
        self.base_channels = base
        self.time_mlp = nn.Sequential(
            nn.Linear(base, emb_dim), nn.GELU(), nn.Linear(emb_dim, emb_dim)
        )
        self.stem = nn.Conv2d(config.in_channels, base, 3, padding=1)

        def attention(channels: int, resolution: int) -> AttentionBlock | None:
            if resolution in cfg.attention_resolutions:
                return AttentionBlock(channels, cfg.num_heads, groups)
            return None

        # Encoder. skip_channels collects the widths of the maps kept as skips, in push order.
        self.down_stages = nn.ModuleList()
        self.encoder_keeps: list[bool] = []
        skip_channels: list[int] = []
        channels, resolution = base, config.image_size
        if keeps_encoder_skip(0, nrb, stride):
            skip_channels.append(channels)
        self.encoder_keeps.append(keeps_encoder_skip(0, nrb, stride))
        levels = len(cfg.channel_mults)
        for level, mult in enumerate(cfg.channel_mults):
            width = mult * base
            for index in range(1, nrb + 1):
                block = ResBlock(channels, width, emb_dim, groups, cfg.dropout)
                self.down_stages.append(Stage(block, attention(width, resolution)))
                channels = width
                keep = keeps_encoder_skip(index, nrb, stride)
                self.encoder_keeps.append(keep)
                if keep:
                    skip_channels.append(channels)
            if level < levels - 1:
                block = ResBlock(channels, channels, emb_dim, groups, cfg.dropout, down=True)
                self.down_stages.append(Stage(block, None))
                resolution //= 2
                keep = keeps_encoder_skip(0, nrb, stride)
                self.encoder_keeps.append(keep)
                if keep:
                    skip_channels.append(channels)

        # Middle: ResBlock -> DACM -> attention -> ResBlock.
        self.middle_in = ResBlock(channels, channels, emb_dim, groups, cfg.dropout)
        self.dacm = DACM(channels, groups, cfg.dacm_dilation) if cfg.dacm else None
        self.middle_attention = AttentionBlock(channels, cfg.num_heads, groups)
        self.middle_out = ResBlock(channels, channels, emb_dim, groups, cfg.dropout)

        # Decoder, mirrored; each level ends with an upsampling block except the last.
        self.up_stages = nn.ModuleList()
        self.decoder_takes: list[bool] = []
        self.upsamplers = nn.ModuleList()
        self.upsample_after: list[int] = []
        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            width = mult * base
            for index in range(nrb + 1):
                take = takes_decoder_skip(index, stride)
                extra = skip_channels.pop() if take else 0
                block = ResBlock(channels + extra, width, emb_dim, groups, cfg.dropout)
                self.up_stages.append(Stage(block, attention(width, resolution)))
                self.decoder_takes.append(take)
                channels = width
            if level > 0:
                self.upsamplers.append(
                    ResBlock(channels, channels, emb_dim, groups, cfg.dropout, up=True)
                )
                self.upsample_after.append(len(self.up_stages) - 1)
                resolution *= 2
        assert not skip_channels, "Sparse-Skip pushes and pops must match"

        self.out_norm = GroupNorm32(groups, channels)
        self.out_conv = zero_module(nn.Conv2d(channels, config.in_channels, 3, padding=1))

    @property
    def skip_concats(self) -> int:
        """Number of skip concatenations in the decoder."""
        return sum(self.decoder_takes)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.base_channels))
        h = self.stem(x)
        skips = [h] if self.encoder_keeps[0] else []
        for stage, keep in zip(self.down_stages, self.encoder_keeps[1:]):
            h = stage(h, emb)
            if keep:
                skips.append(h)
        h = self.middle_in(h, emb)
        if self.dacm is not None:
            h = self.dacm(h)
        h = self.middle_out(self.middle_attention(h), emb)
        upsamplers = iter(self.upsamplers)
        for index, (stage, take) in enumerate(zip(self.up_stages, self.decoder_takes)):
            if take:
                h = torch.cat([h, skips.pop()], dim=1)
            h = stage(h, emb)
            if index in self.upsample_after:
                h = next(upsamplers)(h, emb)
        return self.out_conv(F.gelu(self.out_norm(h)))
