"""Model configuration and the named presets.

``paper`` is the network of the Diff-Fastener paper (and of DiffusionAD, on which it builds):
256 px colour crops, base width 128. ``edge`` is sized for the vehicle: far under the 40 GFLOP
per crop at which an AGX Orin keeps up at 160 km/h (research/perf-anchors.md, B4), narrow
enough (base 16, one residual block per level) to train about four times faster than ``edge-l``
(base 32, two blocks), which exists to measure what the smaller size costs. ``tiny`` is for
tests on a CPU. A preset is a starting point: every field can be overridden, and the resolved
config is stored in each checkpoint and each exported graph's metadata.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from edge.config import StrictModel


class DenoiserConfig(StrictModel):
    """Residual U-Net that predicts the noise added at a diffusion timestep."""

    base_channels: int = Field(128, ge=8, description="width of the first level")
    channel_mults: tuple[int, ...] = Field((1, 1, 2, 2, 4, 4), description="width per level")
    num_res_blocks: int = Field(2, ge=1, description="residual blocks per level")
    attention_resolutions: tuple[int, ...] = Field(
        (32, 16, 8), description="feature-map sizes (px) that get self-attention"
    )
    num_heads: int = Field(4, ge=1)
    norm_groups: int = Field(32, ge=1, description="GroupNorm groups")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    dacm: bool = Field(True, description="DACM block in the middle stage (paper section 3.4)")
    dacm_dilation: int = Field(2, ge=1, description="dilation of the DACM 3x3 convolution")
    skip_stride: int = Field(
        3,
        ge=1,
        description="Sparse-Skip: one skip per this many blocks of a level; 1 is dense skips",
    )


class SegmenterConfig(StrictModel):
    """Plain U-Net that maps (crop, reconstruction) to a per-pixel anomaly map."""

    base_channels: int = Field(64, ge=4)
    channel_mults: tuple[int, ...] = Field((1, 2, 4, 8, 8, 8))
    norm_groups: int = Field(8, ge=1)


class DiffusionConfig(StrictModel):
    """Noise schedule and the timesteps of one-step norm-guided denoising."""

    num_timesteps: int = Field(1000, ge=2)
    beta_start: float = Field(1e-4, gt=0)
    beta_end: float = Field(0.02, gt=0, lt=1)
    t_small: int = Field(200, ge=0, description="small-scale timestep used at inference")
    t_large: int = Field(400, ge=1, description="large-scale timestep used at inference")
    guidance_w: float = Field(1.0, ge=0, description="norm-guidance weight w")
    train_t_small: tuple[int, int] = Field((0, 300), description="t_small ~ U[lo, hi) in training")
    train_t_large: tuple[int, int] = Field(
        (300, 1000), description="t_large ~ U[lo, hi) in training"
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> DiffusionConfig:
        t_max = self.num_timesteps
        if not 0 <= self.t_small < self.t_large < t_max:
            raise ValueError(f"need 0 <= t_small < t_large < {t_max}")
        for name in ("train_t_small", "train_t_large"):
            lo, hi = getattr(self, name)
            if not 0 <= lo < hi <= t_max:
                raise ValueError(f"{name} must satisfy 0 <= lo < hi <= {t_max}")
        return self


class ModelConfig(StrictModel):
    """Everything needed to rebuild a Diff-Fastener model; stored in every checkpoint."""

    preset: str = "custom"
    image_size: int = Field(256, ge=16, description="crop side in pixels (square crops)")
    in_channels: Literal[1, 3] = Field(3, description="1 for grey line-scan, 3 for colour")
    denoiser: DenoiserConfig = DenoiserConfig()
    segmenter: SegmenterConfig = SegmenterConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    top_k: int = Field(50, ge=1, description="image score = mean of the top-k map values")
    noise_seed: int = Field(20250905, description="seed of the fixed inference noise")

    @model_validator(mode="after")
    def _check_geometry(self) -> ModelConfig:
        levels = len(self.denoiser.channel_mults)
        if self.image_size % 2 ** (levels - 1):
            raise ValueError(f"image_size must be divisible by 2**{levels - 1}")
        seg_levels = len(self.segmenter.channel_mults)
        if self.image_size % 2 ** (seg_levels - 1):
            raise ValueError(f"image_size must be divisible by 2**{seg_levels - 1}")
        if self.top_k > self.image_size**2:
            raise ValueError("top_k exceeds the pixels of a crop")
        for mult in self.denoiser.channel_mults:
            if (mult * self.denoiser.base_channels) % self.denoiser.norm_groups:
                raise ValueError("every denoiser width must be divisible by norm_groups")
        return self


PRESETS: dict[str, ModelConfig] = {
    "paper": ModelConfig(preset="paper"),
    "edge": ModelConfig(
        preset="edge",
        image_size=64,
        in_channels=1,
        denoiser=DenoiserConfig(
            base_channels=16,
            channel_mults=(1, 2, 2, 4),
            num_res_blocks=1,
            attention_resolutions=(16, 8),
            norm_groups=8,
        ),
        segmenter=SegmenterConfig(base_channels=16, channel_mults=(1, 2, 4, 8, 8)),
        top_k=16,
    ),
    "edge-l": ModelConfig(
        preset="edge-l",
        image_size=64,
        in_channels=1,
        denoiser=DenoiserConfig(
            base_channels=32,
            channel_mults=(1, 2, 2, 4),
            attention_resolutions=(16, 8),
            norm_groups=8,
        ),
        segmenter=SegmenterConfig(base_channels=16, channel_mults=(1, 2, 4, 8, 8)),
        top_k=16,
    ),
    "tiny": ModelConfig(
        preset="tiny",
        image_size=32,
        in_channels=1,
        denoiser=DenoiserConfig(
            base_channels=16,
            channel_mults=(1, 2, 2),
            num_res_blocks=1,
            attention_resolutions=(8,),
            num_heads=2,
            norm_groups=8,
        ),
        segmenter=SegmenterConfig(base_channels=8, channel_mults=(1, 2, 4), norm_groups=4),
        top_k=8,
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    """The named preset, with top-level fields replaced by ``overrides``.

    Nested fields are replaced with ``denoiser={...}`` style dicts, merged into the preset's.
    """
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    data = PRESETS[name].model_dump()
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return ModelConfig.model_validate(data)
