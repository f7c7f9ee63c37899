"""``edge model-info``: parameters, GFLOP per crop and skip concatenations of a preset.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one crop through the
whole detector (two U-Net passes, run as one batch of two, plus one segmentation pass).
The counter counts matrix products and convolutions (2 FLOP per multiply-add); normalisation,
activations and pooling are not counted.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from edge.model.config import PRESETS, ModelConfig, preset
from edge.model.detector import DiffFastener


def count_parameters(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def model_info(config: ModelConfig) -> dict:
    """Sizes of the detector built from ``config``.

    Returns:
        ``params_m`` (both networks), ``params_m_denoiser``, ``params_m_segmenter``,
        ``gflop_per_crop``, ``skip_concats`` and the config's identifying fields.
    """
    model = DiffFastener(config).eval()
    crop = torch.zeros(1, config.in_channels, config.image_size, config.image_size)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(crop)
    denoiser = count_parameters(model.denoiser)
    segmenter = count_parameters(model.segmenter)
    return {
        "preset": config.preset,
        "image_size": config.image_size,
        "in_channels": config.in_channels,
        "skip_stride": config.denoiser.skip_stride,
        "dacm": config.denoiser.dacm,
        "params_m": round((denoiser + segmenter) / 1e6, 3),
        "params_m_denoiser": round(denoiser / 1e6, 3),
        "params_m_segmenter": round(segmenter / 1e6, 3),
        "gflop_per_crop": round(counter.get_total_flops() / 1e9, 3),
        "skip_concats": model.denoiser.skip_concats,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="edge")
    parser.add_argument(
        "--dense-skips", action="store_true", help="one skip per block (DiffusionAD)"
    )
    parser.add_argument("--no-dacm", action="store_true", help="leave out the DACM block")
    parser.add_argument("--json", action="store_true", help="print JSON on stdout")


def config_from_args(args: argparse.Namespace) -> ModelConfig:
    denoiser: dict = {}
    if args.dense_skips:
        denoiser["skip_stride"] = 1
    if args.no_dacm:
        denoiser["dacm"] = False
    return preset(args.preset, denoiser=denoiser) if denoiser else preset(args.preset)


def run(args: argparse.Namespace) -> int:
    info = model_info(config_from_args(args))
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key:>20}: {value}")
    return 0
