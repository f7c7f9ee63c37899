"""``edge train``: train Diff-Fastener on normal crops (one process, or DDP under torchrun).

Every batch is half normal crops and half normal crops made anomalous on the fly
(:mod:`edge.synthesis`). The losses are DiffusionAD's, which Diff-Fastener keeps (paper
section 3.6): the noise MSE at both timesteps on the normal half, and on the whole batch
``focal_weight * focal(alpha, gamma) + smooth_l1`` between the predicted anomaly map and the
synthetic mask. Adam, with linear warm-up and cosine decay.

Checkpoints: ``last.pt`` (weights, optimizer and step, for ``--resume``) and ``best.pt``
(weights only), chosen by image AUROC on held-out crops of the *training* folder against
anomalies made from them with a fixed seed (the training synthesis, or edited clips). No test
data is ever seen here.

Distributed: ``torchrun --nproc-per-node N -m edge train ...`` runs DDP with the same command
line (gloo on CPU, NCCL on GPU). Each rank draws its own batches; gradients are averaged, so
the effective batch is ``N * batch_size`` and all ranks hold identical weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
from pydantic import Field, ValidationError, model_validator
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from edge.argtypes import positive_int
from edge.config import ConfigError, StrictModel, describe
from edge.errors import ConfigInvalidError, check_output_folder
from edge.evaluate.datasets import load_normal_images, load_test_set
from edge.evaluate.defects import DEFECT_KINDS, ClipBox, make_defect
from edge.logs import configure, get_logger
from edge.model.checkpoint import load_checkpoint, model_id, read_checkpoint, save_checkpoint
from edge.model.config import PRESETS, ModelConfig, preset
from edge.model.detector import DiffFastener
from edge.synthesis import SynthesisConfig, centre_foreground, synthesize

log = get_logger(__name__)


class TrainConfig(StrictModel):
    """A training run. Stored in every checkpoint it writes (``extra["train"]``)."""

    data_dir: str
    out_dir: str = "runs/train"
    model: ModelConfig = PRESETS["edge"]
    synthesis: SynthesisConfig = SynthesisConfig()
    steps: int = Field(1000, ge=1, description="total optimizer steps (resume continues to it)")
    batch_size: int = Field(8, ge=2, description="per process; half normal, half synthetic")
    lr_denoiser: float = Field(1e-4, gt=0)
    lr_segmenter: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(50, ge=0)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    focal_alpha: float = 0.5
    focal_gamma: float = 4.0
    focal_weight: float = 5.0
    smooth_l1_weight: float = 1.0
    denoiser_only_steps: int = Field(
        0,
        ge=0,
        description="first steps train the denoiser alone on all-normal batches (no "
        "segmentation), so the reconstruction is worth comparing against when it starts",
    )
    ema_decay: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="exponential moving average of the weights, validated and shipped "
        "(DDPM practice); None keeps the raw weights",
    )
    detach_reconstruction_steps: int = Field(
        0, ge=0, description="segmentation loss does not reach the denoiser for these steps"
    )
    foreground: Literal["none", "centre"] = Field(
        "none", description="where synthetic anomalies may appear ('centre': the fastener)"
    )
    vertical_flip: bool = Field(True, description="augment with crops seen from the other way")
    jitter_px: int = Field(3, ge=0, description="random shift of each crop, in pixels")
    intensity_jitter: float = Field(
        0.1, ge=0.0, lt=1.0, description="random gain and offset of each crop, as a fraction"
    )
    val_fraction: float = Field(0.1, ge=0.0, lt=0.9)
    validation: Literal["synthetic", "edited"] = Field(
        "synthetic",
        description="anomalies of the validation set: training-style synthesis, or clips "
        "edited to be missing, displaced or broken (edge.evaluate.defects)",
    )
    validation_dir: str | None = Field(
        None,
        description="MVTec-layout folder of held-out crops with defects (e.g. the holdout "
        "scenes of edge prepare-crops) to validate on instead of the training split",
    )
    keep_every: int | None = Field(
        None, ge=1, description="also keep the weights every this many steps (step-N.pt)"
    )
    clip_box: tuple[float, float, float, float] = Field(
        (0.5, 0.5, 0.18, 0.32),
        description="for 'edited' validation: clip centre x, y and half width, half height as "
        "fractions of the crop (canonical crops: clip centred, rail on the right)",
    )
    val_every: int = Field(100, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    seed: int = 0
    num_threads: int | None = Field(None, description="torch CPU threads (default: all)")

    @model_validator(mode="after")
    def _even_batch(self) -> TrainConfig:
        if self.batch_size % 2:
            raise ValueError("batch_size must be even (half normal, half synthetic)")
        return self


def load_training_images(folder: str | Path, config: ModelConfig) -> np.ndarray:
    """Normal crops of ``folder`` (or its ``train/good``) for the model, as float32
    ``(N, H, W, C)`` in ``[0, 1]``."""
    crops = load_normal_images(folder, config.image_size, config.in_channels).crops
    return np.ascontiguousarray(crops.transpose(0, 2, 3, 1) / 255.0).astype(np.float32)


def focal_loss(logits, target, alpha: float, gamma: float):
    """Binary focal loss (Lin et al. 2017) on logits, mean over pixels. Shapes must match."""
    probability = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = probability * target + (1 - probability) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return (alpha_t * (1 - p_t) ** gamma * ce).mean()


class TrainingObjective(nn.Module):
    """The model plus its losses, so that DDP wraps one forward.

    Inputs of :meth:`forward`: crops ``(B, C, H, W)`` in [-1, 1], masks ``(B, 1, H, W)``, a
    bool ``(B,)`` of normal samples, timesteps ``(B,)`` and noises shaped as the crops.
    """

    def __init__(self, model: DiffFastener, config: TrainConfig):
        super().__init__()
        self.model = model
        self.config = config

    def forward(
        self, x0, masks, is_normal, t_small, t_large, noise_small, noise_large, detach, segment
    ):
        x0_guided, eps_small, eps_large = self.model.reconstruct(
            x0, t_small, t_large, noise_small, noise_large
        )
        normal = is_normal[:, None, None, None].to(x0.dtype)
        count = normal.sum() * x0[0].numel()
        noise_loss = (((eps_small - noise_small) ** 2) * normal).sum() / count + (
            ((eps_large - noise_large) ** 2) * normal
        ).sum() / count
        if not segment:
            zero = noise_loss.new_zeros(())
            return noise_loss, {"noise_loss": noise_loss.detach(), "focal": zero, "smooth_l1": zero}
        reconstruction = x0_guided.detach() if detach else x0_guided
        logits = self.model.segmenter.logits(torch.cat([x0, reconstruction], dim=1))
        cfg = self.config
        focal = focal_loss(logits, masks, cfg.focal_alpha, cfg.focal_gamma)
        smooth_l1 = F.smooth_l1_loss(torch.sigmoid(logits), masks)
        total = noise_loss + cfg.focal_weight * focal + cfg.smooth_l1_weight * smooth_l1
        return total, {
            "noise_loss": noise_loss.detach(),
            "focal": focal.detach(),
            "smooth_l1": smooth_l1.detach(),
        }


def validation_key(config: TrainConfig) -> str:
    """Names what best.pt was chosen on; a best score counts only against the same set."""
    if config.validation_dir:
        return f"holdout_image_auroc:{config.validation_dir}"
    return f"{config.validation}_image_auroc"


def same_network(first: ModelConfig, second: ModelConfig) -> bool:
    """Whether two configs build the same weights (diffusion timesteps and top-k aside)."""
    ignored = {"diffusion", "top_k", "preset"}
    return first.model_dump(exclude=ignored) == second.model_dump(exclude=ignored)


def learning_rate_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to 0.05 (or constant) over ``config.steps``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class BatchMaker:
    """Draws training batches: half normal crops, half synthetic anomalies.

    Deterministic in ``(seed, rank, step)``, so a resumed run draws what an unbroken one would.
    """

    def __init__(self, images: np.ndarray, config: TrainConfig, rank: int = 0):
        self.images = images
        self.config = config
        self.rank = rank
        size = config.model.image_size
        self.foreground = centre_foreground((size, size)) if config.foreground == "centre" else None

    def _augment(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Flip, shift and re-light one crop ``(H, W, C)`` in [0, 1]; shape kept."""
        cfg = self.config
        if cfg.vertical_flip and rng.random() < 0.5:
            image = image[::-1]
        if cfg.jitter_px:
            dx, dy = rng.integers(-cfg.jitter_px, cfg.jitter_px + 1, size=2)
            matrix = np.float32([[1, 0, dx], [0, 1, dy]])
            height, width = image.shape[:2]
            shifted = cv2.warpAffine(
                np.ascontiguousarray(image),
                matrix,
                (width, height),
                flags=cv2.INTER_NEAREST,
                borderMode=cv2.BORDER_REFLECT,
            )
            image = shifted.reshape(image.shape)
        if cfg.intensity_jitter:
            gain = 1.0 + rng.uniform(-cfg.intensity_jitter, cfg.intensity_jitter)
            offset = rng.uniform(-cfg.intensity_jitter, cfg.intensity_jitter) / 2
            image = np.clip(image * gain + offset, 0.0, 1.0)
        return image.astype(np.float32)

    def batch(self, step: int, all_normal: bool = False):
        """Returns ``(x0, masks, is_normal)`` as tensors: ``(B, C, H, W)`` in [-1, 1] etc.

        With ``all_normal`` no crop is made anomalous (the denoiser-only phase).
        """
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, self.rank, step])
        picks = rng.integers(0, len(self.images), size=cfg.batch_size)
        crops, masks = [], []
        half = cfg.batch_size if all_normal else cfg.batch_size // 2
        for position, index in enumerate(picks):
            image = self.images[index]
            image = self._augment(image, rng)
            mask = np.zeros(image.shape[:2], np.float32)
            if position >= half:
                synthetic = synthesize(image, cfg.synthesis, rng, self.foreground)
                image, mask = synthetic.image.reshape(image.shape), synthetic.mask
            crops.append(np.ascontiguousarray(image))
            masks.append(mask)
        x0 = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2) * 2.0 - 1.0
        masks_t = torch.from_numpy(np.stack(masks))[:, None]
        is_normal = torch.arange(cfg.batch_size) < half
        return x0.float(), masks_t.float(), is_normal


def validation_set(images: np.ndarray, config: TrainConfig, seed: int = 12345):
    """Held-out normal crops plus anomalies made from them with a fixed seed.

    ``config.validation`` chooses how: the training synthesis, or edited clips (one of each
    kind per crop cycling through missing, displaced, broken). Both come from training-split
    crops only; no test data is involved.

    Returns:
        ``(crops, labels)``: float32 ``(2N, C, H, W)`` in pixel units, int ``(2N,)``.
    """
    rng = np.random.default_rng(seed)
    size = config.model.image_size
    foreground = centre_foreground((size, size)) if config.foreground == "centre" else None
    anomalous = []
    for number, image in enumerate(images):
        if config.validation == "edited":
            cx, cy, half_w, half_h = (value * size for value in config.clip_box)
            kind = DEFECT_KINDS[number % len(DEFECT_KINDS)]
            box = ClipBox(cx, cy, half_w, half_h)
            edited, _ = make_defect(kind, image[..., 0], box, -1, rng)
            anomalous.append(edited.reshape(image.shape))
        else:
            synthetic = synthesize(image, config.synthesis, rng, foreground)
            anomalous.append(synthetic.image.reshape(image.shape))
    crops = np.concatenate([images, np.stack(anomalous)]) * 255.0
    labels = np.r_[np.zeros(len(images)), np.ones(len(images))].astype(int)
    return np.ascontiguousarray(crops.transpose(0, 3, 1, 2)).astype(np.float32), labels


@torch.inference_mode()
def score_crops(model: DiffFastener, crops: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Image scores of crops ``(N, C, H, W)`` in pixel units, in eval mode. Returns ``(N,)``."""
    was_training = model.training
    model.eval()
    scores = []
    for start in range(0, len(crops), batch_size):
        _, score, _ = model(torch.from_numpy(crops[start : start + batch_size]))
        scores.append(score.numpy())
    model.train(was_training)
    return np.concatenate(scores)


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


@torch.no_grad()
def _update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model``, parameters and buffers alike."""
    for averaged, current in zip(ema.state_dict().values(), model.state_dict().values()):
        if averaged.dtype.is_floating_point:
            averaged.mul_(decay).add_(current.detach(), alpha=1.0 - decay)
        else:
            averaged.copy_(current)


def _check_replicas(model: DiffFastener, rank: int, world: int) -> None:
    """Log each rank's model id and fail loudly if the replicas drifted apart."""
    identity = model_id(model.state_dict(), model.config)
    gathered: list[str | None] = [None] * world
    torch.distributed.all_gather_object(gathered, identity)
    log.info("replica_weights", rank=rank, model_id=identity, identical=len(set(gathered)) == 1)
    if len(set(gathered)) != 1:
        raise RuntimeError(f"DDP replicas differ after training: {gathered}")


def train(
    config: TrainConfig, resume: str | Path | None = None, images: np.ndarray | None = None
) -> Path:
    """Run training; returns the path of ``best.pt`` (or ``last.pt`` without validation).

    ``images`` (float32 ``(N, H, W, C)`` in [0, 1]) replaces the crops of ``config.data_dir``;
    cross-validation passes each fold's training crops this way.
    """
    rank, world = _distributed()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    out_dir = Path(config.out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(config.to_json() + "\n")

    # 1. Data: normal crops, a validation split held out of training.
    if images is None:
        images = load_training_images(config.data_dir, config.model)
    order = np.random.default_rng(config.seed).permutation(len(images))
    n_val = int(round(config.val_fraction * len(images)))
    val_images, train_images = images[order[:n_val]], images[order[n_val:]]
    if config.validation_dir is not None:
        held_out = load_test_set(
            config.validation_dir, config.model.image_size, config.model.in_channels
        )
        # Every normal crop and every third defect: half the scoring time, all kinds kept.
        keep = np.flatnonzero(held_out.labels == 0)
        keep = np.r_[keep, np.flatnonzero(held_out.labels == 1)[::3]]
        val_crops = np.ascontiguousarray(held_out.crops[keep])
        val_labels = held_out.labels[keep]
    elif n_val:
        val_crops, val_labels = validation_set(val_images, config)
    else:
        val_crops, val_labels = None, None
    log.info("training_data", train_crops=len(train_images), val_crops=n_val, rank=rank)

    # 2. Model and optimizer, fresh or resumed.
    step, best_auroc = 0, -1.0
    model = DiffFastener(config.model)
    optimizer = torch.optim.Adam(
        [
            {"params": model.denoiser.parameters(), "lr": config.lr_denoiser},
            {"params": model.segmenter.parameters(), "lr": config.lr_segmenter},
        ]
    )
    if resume is not None:
        stored, payload = load_checkpoint(resume)
        if not same_network(stored.config, config.model):
            raise ValueError(f"{resume}: its network differs from this run's model config")
        # Timesteps and top-k may change between stages of training; the weights stay.
        model = DiffFastener(config.model)
        model.load_state_dict(payload.get("raw_model", payload["model"]))
        optimizer = torch.optim.Adam(
            [
                {"params": model.denoiser.parameters(), "lr": config.lr_denoiser},
                {"params": model.segmenter.parameters(), "lr": config.lr_segmenter},
            ]
        )
        if "optimizer" in payload:
            optimizer.load_state_dict(payload["optimizer"])
        step = int(payload["step"])
        if payload["extra"].get("validation_key") == validation_key(config):
            best_auroc = float(payload["extra"].get("best_val_auroc", -1.0))
        log.info("resumed", checkpoint=str(resume), step=step, best_val_auroc=best_auroc)
    model.train()
    ema = copy.deepcopy(model).eval() if config.ema_decay is not None else None
    if ema is not None and resume is not None:
        ema.load_state_dict(payload["model"])
        ema.train(False)
    shipped = ema if ema is not None else model
    objective: nn.Module = TrainingObjective(model, config)
    if world > 1:
        objective = nn.parallel.DistributedDataParallel(
            objective, find_unused_parameters=config.denoiser_only_steps > 0
        )
    base_lrs = [config.lr_denoiser, config.lr_segmenter]
    batches = BatchMaker(train_images, config, rank)
    extra = {"train": json.loads(config.to_json()), "data_dir": str(config.data_dir)}

    def save(name: str, with_optimizer: bool) -> None:
        extra["best_val_auroc"] = best_auroc
        extra["validation_key"] = validation_key(config)
        resume_state = None
        if with_optimizer and ema is not None:
            resume_state = {name: t.detach().clone() for name, t in model.state_dict().items()}
        save_checkpoint(
            out_dir / name,
            shipped,
            step=step,
            optimizer=optimizer.state_dict() if with_optimizer else None,
            extra=extra,
            raw_model=resume_state,
        )

    # 3. The loop.
    progress = tqdm(
        total=config.steps, initial=step, disable=rank != 0 or None, desc="train", unit="step"
    )
    started = time.monotonic()
    while step < config.steps:
        factor = learning_rate_factor(step, config)
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * factor
        segment = step >= config.denoiser_only_steps
        x0, masks, is_normal = batches.batch(step, all_normal=not segment)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step * 97 + rank)
        lo_s, hi_s = config.model.diffusion.train_t_small
        lo_l, hi_l = config.model.diffusion.train_t_large
        batch = x0.shape[0]
        t_small = torch.randint(lo_s, hi_s, (batch,), generator=generator).float()
        t_large = torch.randint(lo_l, hi_l, (batch,), generator=generator).float()
        noise_small = torch.randn(x0.shape, generator=generator)
        noise_large = torch.randn(x0.shape, generator=generator)
        detach = step < config.detach_reconstruction_steps
        loss, parts = objective(
            x0, masks, is_normal, t_small, t_large, noise_small, noise_large, detach, segment
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            _update_ema(ema, model, min(config.ema_decay, (1 + step) / (10 + step)))
        step += 1
        progress.update(1)
        if rank == 0 and (step % 10 == 0 or step == config.steps):
            log.info(
                "train_step",
                step=step,
                loss=round(float(loss.detach()), 5),
                **{k: round(float(v), 5) for k, v in parts.items()},
                lr_factor=round(factor, 4),
                seconds_per_step=round((time.monotonic() - started) / 10, 3),
            )
            started = time.monotonic()

        # 4. Validation on held-out normal crops and their synthetic anomalies (rank 0).
        if (
            rank == 0
            and val_crops is not None
            and segment
            and (step % config.val_every == 0 or step == config.steps)
        ):
            scores = score_crops(shipped, val_crops)
            auroc = float(roc_auc_score(val_labels, scores))
            key = validation_key(config).split(":")[0]
            log.info("validation", step=step, **{key: round(auroc, 4)})
            with (out_dir / "validation.jsonl").open("a") as record:
                record.write(json.dumps({"step": step, key: auroc}) + "\n")
            if auroc > best_auroc:
                best_auroc = auroc
                save("best.pt", with_optimizer=False)
        if rank == 0 and (step % config.checkpoint_every == 0 or step == config.steps):
            save("last.pt", with_optimizer=True)
        if rank == 0 and config.keep_every and step % config.keep_every == 0:
            save(f"step-{step}.pt", with_optimizer=False)
    progress.close()
    if world > 1:
        _check_replicas(model, rank, world)
    best = out_dir / "best.pt"
    return best if best.exists() else out_dir / "last.pt"


def even_batch_size(text: str) -> int:
    """An argparse type: an even whole number of at least 2 (half normal, half synthetic)."""
    value = int(text)
    if value < 2 or value % 2:
        raise argparse.ArgumentTypeError(
            f"{text} is not an even whole number of at least 2 (half normal, half synthetic)"
        )
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:

    parser.add_argument("data_dir", help="folder of normal crops, or an MVTec category folder")
    parser.add_argument("--config", help="TrainConfig JSON; flags below override it")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="model preset (default edge)")
    parser.add_argument("--out", help="output folder for checkpoints (default runs/train)")
    parser.add_argument("--steps", type=positive_int)
    parser.add_argument("--batch-size", type=even_batch_size)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--resume", help="checkpoint (last.pt) to continue from")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads")


class _TrainConfigFile(TrainConfig):
    """A ``--config`` file: a :class:`TrainConfig` whose data folder may come from the command
    line instead."""

    data_dir: str | None = None


def build_config(config_file: str | None, **overrides) -> TrainConfig:
    """The :class:`TrainConfig` of a ``--config`` file (or the defaults) with ``overrides``
    (the flags given, by field name) on top.

    Raises:
        ConfigInvalidError: the file is missing, unreadable or does not match the schema
            (the message names it and the key), or the flags do not fit it.
    """
    data: dict = {}
    if config_file is not None:
        try:
            data = _TrainConfigFile.load(config_file).model_dump(exclude_unset=True)
        except ConfigError as error:
            raise ConfigInvalidError(str(error)) from error
    data.update(overrides)
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as error:
        source = f"{config_file} with the flags given" if config_file else "the flags given"
        raise ConfigInvalidError(f"{source}: {describe(error)}") from error


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides: dict = {"data_dir": args.data_dir}
    if args.preset:
        overrides["model"] = json.loads(preset(args.preset).to_json())
    for flag, key in [
        ("out", "out_dir"),
        ("steps", "steps"),
        ("batch_size", "batch_size"),
        ("seed", "seed"),
        ("threads", "num_threads"),
    ]:
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    return build_config(args.config, **overrides)


def run(args: argparse.Namespace) -> int:
    configure("train")
    config = config_from_args(args)
    check_output_folder(config.out_dir, "--out" if args.out else "out_dir")
    if args.resume:
        read_checkpoint(args.resume)
    best = train(config, resume=args.resume)
    log.info("training_done", checkpoint=str(best))
    return 0
