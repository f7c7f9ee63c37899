"""Labelled crop sets on disk: the MVTec AD layout, a plain normal/abnormal layout, and
folders of normal training crops; plus the stratified k-fold split for cross-validation.

Layouts (``root`` is the folder given on the command line):

- MVTec AD: ``root/train/good/*``, ``root/test/good/*``, ``root/test/<defect>/*`` and,
  optionally, ``root/ground_truth/<defect>/<stem>_mask.png``. A pixel is a defect where its
  mask value is > 0 (MVTec 3D-AD masks hold class ids such as 253, 254, 255).
- Plain folders: ``root/normal/*`` and ``root/abnormal/*``, optionally ``root/masks/<stem>.png``
  (or ``<stem>_mask.png``) for the abnormal images.
- Training: ``root/train/good/*`` when it exists, else the images directly inside ``root``.

Every image becomes a crop as the model takes it: float32 ``(C, S, S)`` in pixel units
``[0, 255]`` (16-bit files scaled by ``255 / 65535``), resized to ``S = image_size`` (cv2
``INTER_AREA`` when shrinking, which averages and so does not alias; ``INTER_LINEAR`` when
enlarging), grey for ``in_channels == 1`` and RGB for 3. Masks are resized with nearest
neighbour. Known limits: a non-square image is stretched to a square, not cropped; a defect
smaller than one output pixel can vanish from its nearest-resized mask (counted in the
``masks_emptied_by_resize`` log field); the whole set is held in memory, about
``4 * C * S * S`` bytes per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
from sklearn.model_selection import StratifiedKFold

from edge.errors import InputUnreadableError
from edge.logs import get_logger

log = get_logger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NORMAL_TYPE = "good"
"""Defect type of normal images, whatever the layout (MVTec's name for them)."""

MVTEC = "mvtec"
FOLDERS = "folders"
NORMAL_ONLY = "normal"


@dataclass(frozen=True)
class CropSet:
    """Crops with their labels, masks and origins.

    Attributes:
        crops: float32 ``(n, C, S, S)`` in ``[0, 255]``.
        labels: int64 ``(n,)``; 0 normal, 1 anomalous.
        masks: uint8 ``(n, S, S)`` of 0/1, or ``None`` when the layout has no masks.
        defect_types: ``n`` names; ``"good"`` for normal crops.
        paths: ``n`` source files.
        layout: ``"mvtec"``, ``"folders"`` or ``"normal"`` (a training folder).
        root: the folder the set was read from.
    """

    crops: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None
    defect_types: list[str]
    paths: list[Path]
    layout: str
    root: Path

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int] | np.ndarray) -> CropSet:
        """The crops at ``indices``, in that order (for cross-validation folds)."""
        indices = np.asarray(indices, dtype=np.int64)
        return replace(
            self,
            crops=self.crops[indices],
            labels=self.labels[indices],
            masks=None if self.masks is None else self.masks[indices],
            defect_types=[self.defect_types[i] for i in indices],
            paths=[self.paths[i] for i in indices],
        )


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (not recursive)."""
    return sorted(
        path
        for path in Path(folder).iterdir()
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    )


def _resize(image: np.ndarray, image_size: int, interpolation_if_larger: int) -> np.ndarray:
    height, width = image.shape[:2]
    if (height, width) == (image_size, image_size):
        return image
    shrinking = height > image_size or width > image_size
    interpolation = interpolation_if_larger if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (image_size, image_size), interpolation=interpolation)


def load_image(path: str | Path, image_size: int, in_channels: int) -> np.ndarray:
    """One image file as a model crop.

    Args:
        path: an 8- or 16-bit grey, BGR or BGRA image file.
        image_size: side ``S`` of the square crop.
        in_channels: 1 (grey) or 3 (RGB).
    Returns:
        float32 ``(in_channels, S, S)`` in ``[0, 255]``.
    """
    path = Path(path)
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise InputUnreadableError(f"{path}: not a readable image")
    scale = 255.0 / 65535.0 if image.dtype == np.uint16 else 1.0
    if image.dtype not in (np.uint8, np.uint16):
        raise InputUnreadableError(f"{path}: unsupported pixel type {image.dtype}")
    image = image.astype(np.float32) * np.float32(scale)
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if in_channels == 1 and image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    elif in_channels == 3:
        conversion = cv2.COLOR_GRAY2RGB if image.ndim == 2 else cv2.COLOR_BGR2RGB
        image = cv2.cvtColor(image, conversion)
    elif in_channels != 1:
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    image = _resize(image, image_size, cv2.INTER_AREA)
    if image.ndim == 2:
        image = image[:, :, None]
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)


def load_mask(path: str | Path, image_size: int) -> np.ndarray:
    """A ground-truth mask, defect where any channel is > 0, resized by nearest neighbour.

    Returns:
        uint8 ``(S, S)`` of 0 and 1.
    """
    path = Path(path)
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise InputUnreadableError(f"{path}: not a readable mask image")
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    mask = (mask > 0).astype(np.uint8)
    return _resize(mask, image_size, cv2.INTER_NEAREST)


def _find_mask(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}_mask", stem):
        for suffix in IMAGE_SUFFIXES:
            candidate = folder / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def detect_layout(root: str | Path) -> str:
    """``"mvtec"`` when ``root/test`` exists, ``"folders"`` when ``root/normal`` or
    ``root/abnormal`` does; otherwise :class:`InputUnreadableError` naming ``root``."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise InputUnreadableError(f"{root}: a file, not a folder")
    if not root.is_dir():
        raise InputUnreadableError(f"{root}: no such folder")
    if (root / "test").is_dir():
        return MVTEC
    if (root / "normal").is_dir() or (root / "abnormal").is_dir():
        return FOLDERS
    raise InputUnreadableError(
        f"{root}: layout not recognised; expected MVTec AD (test/good, test/<defect>, "
        "optional ground_truth/<defect>/<name>_mask.png) or normal/ and abnormal/ "
        "(optional masks/)"
    )


@dataclass
class _Entry:
    path: Path
    label: int
    defect_type: str
    mask_path: Path | None


def _mvtec_entries(root: Path) -> tuple[list[_Entry], bool]:
    test = root / "test"
    ground_truth = root / "ground_truth"
    has_masks = ground_truth.is_dir()
    entries = []
    for folder in sorted(path for path in test.iterdir() if path.is_dir()):
        defect_type = folder.name
        label = 0 if defect_type == NORMAL_TYPE else 1
        for path in list_images(folder):
            mask_path = None
            if has_masks and label:
                mask_path = _find_mask(ground_truth / defect_type, path.stem)
                if mask_path is None:
                    raise InputUnreadableError(
                        f"{ground_truth / defect_type}: no mask for {path} "
                        f"(expected {path.stem}_mask.png)"
                    )
            entries.append(_Entry(path, label, defect_type, mask_path))
    return entries, has_masks


def _folder_entries(root: Path) -> tuple[list[_Entry], bool]:
    masks = root / "masks"
    has_masks = masks.is_dir()
    entries = []
    for name, label in (("normal", 0), ("abnormal", 1)):
        folder = root / name
        if not folder.is_dir():
            continue
        for path in list_images(folder):
            mask_path = None
            if has_masks and label:
                mask_path = _find_mask(masks, path.stem)
                if mask_path is None:
                    raise InputUnreadableError(
                        f"{masks}: no mask for {path} (expected {path.stem}.png)"
                    )
            entries.append(_Entry(path, label, NORMAL_TYPE if label == 0 else name, mask_path))
    return entries, has_masks


def _load_entries(
    entries: list[_Entry],
    has_masks: bool,
    image_size: int,
    in_channels: int,
    layout: str,
    root: Path,
) -> CropSet:
    crops = np.empty((len(entries), in_channels, image_size, image_size), dtype=np.float32)
    masks = np.zeros((len(entries), image_size, image_size), dtype=np.uint8) if has_masks else None
    emptied = 0
    for index, entry in enumerate(entries):
        crops[index] = load_image(entry.path, image_size, in_channels)
        if masks is not None and entry.mask_path is not None:
            masks[index] = load_mask(entry.mask_path, image_size)
            emptied += int(not masks[index].any())
    if emptied:
        log.warning("masks_emptied_by_resize", masks=emptied, image_size=image_size)
    log.info(
        "crop_set_loaded",
        root=str(root),
        layout=layout,
        images=len(entries),
        anomalous=sum(entry.label for entry in entries),
        masks=has_masks,
    )
    return CropSet(
        crops=crops,
        labels=np.array([entry.label for entry in entries], dtype=np.int64),
        masks=masks,
        defect_types=[entry.defect_type for entry in entries],
        paths=[entry.path for entry in entries],
        layout=layout,
        root=root,
    )


def load_test_set(root: str | Path, image_size: int, in_channels: int) -> CropSet:
    """The labelled test images of ``root``, in either layout (see the module docstring).

    Args:
        root: an MVTec-layout category folder or a normal/abnormal folder.
        image_size: crop side ``S`` (the model's ``image_size``).
        in_channels: 1 or 3 (the model's ``in_channels``).
    Returns:
        :class:`CropSet` ordered by defect folder, then file name.
    Raises:
        InputUnreadableError: unknown layout, no image, a missing mask or an unreadable file;
            the message names the folder or file.
    """
    root = Path(root)
    layout = detect_layout(root)
    entries, has_masks = _mvtec_entries(root) if layout == MVTEC else _folder_entries(root)
    if not entries:
        where = root / "test" if layout == MVTEC else root
        raise InputUnreadableError(f"{where}: no test images found")
    return _load_entries(entries, has_masks, image_size, in_channels, layout, root)


def training_folder(root: str | Path) -> Path:
    """Where the normal training images of ``root`` are: ``root/train/good`` or ``root``."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise InputUnreadableError(f"{root}: a file, not a folder")
    if not root.is_dir():
        raise InputUnreadableError(f"{root}: no such folder")
    mvtec_train = root / "train" / "good"
    return mvtec_train if mvtec_train.is_dir() else root


def load_normal_images(root: str | Path, image_size: int, in_channels: int) -> CropSet:
    """Normal training crops: ``root/train/good`` of an MVTec layout, else the images in ``root``.

    Args:
        root: a folder of normal crops, or an MVTec-layout category folder.
        image_size, in_channels: as for :func:`load_test_set`.
    Returns:
        :class:`CropSet` with every label 0, defect type ``"good"`` and no masks.
    Raises:
        InputUnreadableError: the folder does not exist or holds no image.
    """
    folder = training_folder(root)
    paths = list_images(folder)
    if not paths:
        raise InputUnreadableError(
            f"{folder}: no normal training images (expected image files here or in train/good/)"
        )
    entries = [_Entry(path, 0, NORMAL_TYPE, None) for path in paths]
    return _load_entries(entries, False, image_size, in_channels, NORMAL_ONLY, folder)


def stratified_folds(
    labels: Sequence[int] | np.ndarray, n_folds: int = 5, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split indices into ``n_folds`` folds that keep the label proportions (paper: 5 folds).

    Deterministic for a given ``seed``: the indices are shuffled once with it, then dealt
    into folds class by class (scikit-learn's ``StratifiedKFold``).

    Args:
        labels: ``(n,)`` class of each item (all zeros for a normal-only training set).
        n_folds: number of folds, at least 2 and at most ``n``.
        seed: shuffling seed.
    Returns:
        ``n_folds`` pairs ``(train_indices, held_out_indices)``; every index is held out in
        exactly one fold.
    """
    labels = np.asarray(labels).ravel()
    if not 2 <= n_folds <= labels.size:
        raise ValueError(f"need 2 <= n_folds <= {labels.size} items, got n_folds={n_folds}")
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return [
        (np.sort(train), np.sort(held_out))
        for train, held_out in splitter.split(np.zeros(labels.size), labels)
    ]
