"""Checkpoints: the model's config and weights in one file that loads with ``weights_only=True``.

A checkpoint is a plain dict of tensors, strings and numbers (never pickled objects), so
loading one cannot run code. ``model_id`` is a short hash of the weights and the config: it
names the model in every alarm, export and threshold file, so an alarm can always be traced to
the model that raised it. The config is part of it because inference settings (the timesteps,
the guidance weight, top-k) change the scores without changing a weight, and a threshold fitted
on one setting means nothing on another.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import torch

from edge.config import ConfigError
from edge.errors import ModelInvalidError
from edge.model.config import ModelConfig
from edge.model.detector import DiffFastener

FORMAT = "diff-fastener-checkpoint/1"
OTHER_MODEL_FILES = {
    ".onnx": "an ONNX graph",
    ".plan": "a TensorRT plan",
    ".engine": "a TensorRT plan",
}
"""Model files that are not checkpoints, by suffix, for a message that says what was given."""


def weights_id(state_dict: dict[str, torch.Tensor]) -> str:
    """First 12 hex digits of the SHA-256 of the weights (names, shapes and bytes)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:12]


def model_id(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> str:
    """First 12 hex digits of the SHA-256 of the weights' id and the config's JSON."""
    digest = hashlib.sha256(weights_id(state_dict).encode())
    digest.update(config.to_json().encode())
    return digest.hexdigest()[:12]


def save_checkpoint(
    path: str | Path,
    model: DiffFastener,
    step: int = 0,
    optimizer: dict | None = None,
    extra: dict | None = None,
    raw_model: dict | None = None,
) -> str:
    """Write ``model`` (and, for resuming, the optimizer state) atomically; returns the model id.

    ``extra`` holds JSON-like training facts (data folder, seed, losses) for the record.
    ``raw_model`` is the state dict training continues from when ``model`` holds averaged
    (EMA) weights.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    identity = model_id(state, model.config)
    payload = {
        "format": FORMAT,
        "config": model.config.to_json(),
        "model_id": identity,
        "step": int(step),
        "model": state,
        "extra": extra or {},
    }
    if optimizer is not None:
        payload["optimizer"] = optimizer
    if raw_model is not None:
        payload["raw_model"] = raw_model
    temporary = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)
    return identity


def read_checkpoint(path: str | Path) -> dict:
    """The raw checkpoint dict, checked for format; raises :class:`ModelInvalidError`."""
    path = Path(path)
    if path.is_dir():
        raise ModelInvalidError(f"{path}: a folder, not a checkpoint file (.pt)")
    if not path.is_file():
        raise ModelInvalidError(f"{path}: no such checkpoint")
    if path.suffix.lower() in OTHER_MODEL_FILES:
        raise ModelInvalidError(
            f"{path}: {OTHER_MODEL_FILES[path.suffix.lower()]}, not a checkpoint; this command "
            "needs the .pt checkpoint written by edge train (e.g. runs/NAME/best.pt)"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # Not torch's text: it suggests weights_only=False, which would let the file run code.
        raise ModelInvalidError(
            f"{path}: not a checkpoint written by edge train (damaged, or another kind of file)"
        ) from error
    except Exception as error:  # torch raises several types for a damaged file
        raise ModelInvalidError(f"{path}: not a readable checkpoint ({error})") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelInvalidError(f"{path}: not a Diff-Fastener checkpoint ({FORMAT})")
    return payload


def load_checkpoint(path: str | Path) -> tuple[DiffFastener, dict]:
    """Rebuild the model of a checkpoint, in eval mode on the CPU.

    Returns:
        ``(model, payload)``; ``payload`` has ``model_id``, ``step``, ``extra`` and, when the
        checkpoint was written for resuming, ``optimizer``.
    """
    payload = read_checkpoint(path)
    try:
        config = ModelConfig.from_json(payload["config"], source=str(path))
    except ConfigError as error:
        raise ModelInvalidError(str(error)) from error
    model = DiffFastener(config)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as error:
        raise ModelInvalidError(
            f"{path}: weights do not fit the stored config ({error})"
        ) from error
    actual = model_id(payload["model"], config)
    if actual != payload.get("model_id"):
        raise ModelInvalidError(
            f"{path}: weights and config hash to {actual}, not to the recorded model id "
            f"{payload.get('model_id')} (file damaged or edited)"
        )
    return model.eval(), payload
