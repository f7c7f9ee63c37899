"""Online anomaly synthesis: turn normal crops into anomalous ones with a known mask.

Diff-Fastener trains on normal fasteners only; half of every batch is made anomalous on the fly
(paper section 3.5, after DRAEM and DiffusionAD). A region is drawn from thresholded Perlin
noise (or, as in CutPaste, a rotated rectangle), optionally restricted to a foreground mask (the
fastener, not the ballast), and filled with a texture blended over the crop with a random
opacity. Textures come from the crop itself
or from noise, never from an external data set:

- ``self``: an augmented copy of the crop, its blocks shuffled (DiffusionAD's self-augmentation);
- ``noise``: a Perlin texture of random contrast (anomalib's fallback when no texture set);
- ``shifted``: the crop moved by a random offset, so the region shows what lies beside it, the
  way a missing clip shows sleeper, or a displaced clip shows up where it should not be.

Arrays are float32 ``(height, width)`` or ``(height, width, channels)`` in ``[0, 1]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from edge.config import StrictModel

TEXTURES = ("self", "noise", "shifted")
REGIONS = ("perlin", "rectangle")


class SynthesisConfig(StrictModel):
    """How synthetic anomalies are drawn. Defaults follow DiffusionAD unless noted."""

    perlin_scale_exponents: tuple[int, int] = (0, 5)
    """Perlin lattice cells per axis are ``2**k`` for ``k`` drawn in this closed range."""
    threshold: float = 0.5
    """Perlin values above this form the anomaly region."""
    opacity: tuple[float, float] = (0.2, 0.8)
    """Weight ``beta`` of the original crop inside the region, drawn in ``[lo, hi)``."""
    texture_weights: dict[str, float] = {"self": 0.5, "noise": 0.5, "shifted": 0.0}
    """Relative probability of each texture source."""
    shift_fraction: tuple[float, float] = (0.25, 0.5)
    """For ``shifted``: offset as a fraction of the crop side, drawn in ``[lo, hi)``."""
    shift_near_axes: bool = False
    """For ``shifted``: offsets along the crop's axes (across or along the track) only."""
    block_grid: int = 8
    """For ``self``: the crop is cut into ``block_grid x block_grid`` blocks and shuffled."""
    region_weights: dict[str, float] = {"perlin": 1.0, "rectangle": 0.0}
    """Relative probability of each region shape: thresholded Perlin noise (DiffusionAD), or a
    rectangle rotated by up to ``rectangle_max_angle`` (CutPaste, Li et al. 2021): with the
    ``shifted`` texture, a patch of the crop pasted where it does not belong."""
    rectangle_sides: tuple[float, float] = (0.15, 0.5)
    """For ``rectangle``: each side a fraction of the crop side, drawn in ``[lo, hi)``."""
    rectangle_max_angle: float = 15.0
    """For ``rectangle``: rotation in degrees, drawn in ``[-max, max)``."""
    feather_px: tuple[float, float] = (0.0, 0.0)
    """Blur of the blend's edge (Gaussian sigma in pixels, drawn in ``[lo, hi]``); the target
    mask stays binary. DiffusionAD blends with a hard edge, a seam no real defect has, which a
    segmentation head can learn to find instead of the anomaly itself."""
    min_area_fraction: float = 0.0
    """Redraw a region smaller than this fraction of the crop (0 keeps any non-empty one)."""
    max_tries: int = 8


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(shape: tuple[int, int], cells: tuple[int, int], rng: np.random.Generator):
    """Gradient (Perlin) noise of ``shape`` with ``cells`` lattice cells per axis.

    Returns:
        float32 ``(height, width)``, scaled by ``sqrt(2)`` to lie within ``[-1, 1]`` (the range
        the 0.5 threshold of DRAEM and DiffusionAD refers to).
    """
    height, width = shape
    cells_y, cells_x = cells
    angles = rng.uniform(0.0, 2.0 * math.pi, size=(cells_y + 1, cells_x + 1))
    gradients = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    y = np.linspace(0.0, cells_y, height, endpoint=False)
    x = np.linspace(0.0, cells_x, width, endpoint=False)
    yy, xx = np.meshgrid(y, x, indexing="ij")
    iy, ix = yy.astype(int), xx.astype(int)
    fy, fx = yy - iy, xx - ix

    def corner(dy: int, dx: int) -> np.ndarray:
        g = gradients[iy + dy, ix + dx]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    uy, ux = _fade(fy), _fade(fx)
    top = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
    bottom = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
    return (math.sqrt(2.0) * (top * (1 - uy) + bottom * uy)).astype(np.float32)


def _rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2.0, height / 2.0), degrees, 1.0)
    return cv2.warpAffine(
        image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
    )


def perlin_mask(
    shape: tuple[int, int], config: SynthesisConfig, rng: np.random.Generator
) -> np.ndarray:
    """A binary anomaly region: rotated Perlin noise over the threshold.

    Cells per axis are drawn independently as ``2**k``; the noise is rotated by an angle in
    ``[-90, 90)`` degrees. Returns float32 ``(height, width)`` of 0 and 1.
    """
    lo, hi = config.perlin_scale_exponents
    cells = (2 ** int(rng.integers(lo, hi + 1)), 2 ** int(rng.integers(lo, hi + 1)))
    side = max(shape)
    noise = perlin_noise((side, side), cells, rng)
    noise = _rotate(noise, float(rng.uniform(-90.0, 90.0)))[: shape[0], : shape[1]]
    return (noise > config.threshold).astype(np.float32)


def rectangle_mask(
    shape: tuple[int, int],
    config: SynthesisConfig,
    rng: np.random.Generator,
    foreground: np.ndarray | None = None,
) -> np.ndarray:
    """A binary anomaly region: a rotated rectangle, centred on a random pixel of
    ``foreground`` (anywhere when None). Returns float32 ``(height, width)`` of 0 and 1."""
    height, width = shape
    if foreground is not None and foreground.any():
        ys, xs = np.nonzero(foreground)
        pick = int(rng.integers(len(ys)))
        centre = (float(xs[pick]), float(ys[pick]))
    else:
        centre = (float(rng.uniform(0, width)), float(rng.uniform(0, height)))
    sides = rng.uniform(*config.rectangle_sides, size=2) * min(height, width)
    angle = float(rng.uniform(-config.rectangle_max_angle, config.rectangle_max_angle))
    corners = cv2.boxPoints((centre, (float(sides[0]), float(sides[1])), angle))
    mask = np.zeros(shape, np.uint8)
    cv2.fillConvexPoly(mask, np.round(corners).astype(np.int32), 1)
    return mask.astype(np.float32)


def _as_3d(image: np.ndarray) -> np.ndarray:
    return image[..., None] if image.ndim == 2 else image


def self_texture(image: np.ndarray, grid: int, rng: np.random.Generator) -> np.ndarray:
    """An augmented copy of ``image`` with its ``grid x grid`` blocks shuffled. Shape kept."""
    image = _as_3d(image)
    gamma = float(rng.uniform(0.5, 2.0))
    contrast = float(rng.uniform(0.6, 1.4))
    brightness = float(rng.uniform(-0.2, 0.2))
    texture = np.clip(image, 0.0, 1.0) ** gamma
    texture = np.clip((texture - 0.5) * contrast + 0.5 + brightness, 0.0, 1.0)
    if rng.random() < 0.5:
        texture = 1.0 - texture
    height, width = texture.shape[:2]
    block_h, block_w = height // grid, width // grid
    blocks = [
        texture[r * block_h : (r + 1) * block_h, c * block_w : (c + 1) * block_w]
        for r in range(grid)
        for c in range(grid)
    ]
    order = rng.permutation(len(blocks))
    rows = [
        np.concatenate([blocks[order[r * grid + c]] for c in range(grid)], axis=1)
        for r in range(grid)
    ]
    shuffled = texture.copy()
    shuffled[: grid * block_h, : grid * block_w] = np.concatenate(rows, axis=0)
    return shuffled.astype(np.float32)


def noise_texture(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A Perlin texture in ``[0, 1]`` with random mean and contrast, of ``shape`` (H, W, C)."""
    cells = 2 ** int(rng.integers(1, 5))
    noise = perlin_noise(shape[:2], (cells, cells), rng)
    mean, contrast = float(rng.uniform(0.1, 0.9)), float(rng.uniform(0.5, 2.0))
    texture = np.clip(mean + contrast * noise, 0.0, 1.0)
    return np.repeat(texture[..., None], shape[2], axis=2).astype(np.float32)


def shifted_texture(
    image: np.ndarray,
    fraction: tuple[float, float],
    rng: np.random.Generator,
    near_axes: bool = False,
) -> np.ndarray:
    """``image`` moved by a random offset (reflected at the border). Shape kept.

    With ``near_axes`` the offset points within 15 degrees of a crop axis: across the track
    (along the sleeper, where a clip's surroundings are sleeper surface) or along it.
    """
    image = _as_3d(image)
    height, width = image.shape[:2]
    distance = float(rng.uniform(*fraction)) * min(height, width)
    if near_axes:
        angle = math.radians(90.0 * int(rng.integers(4)) + float(rng.uniform(-15.0, 15.0)))
    else:
        angle = float(rng.uniform(0.0, 2.0 * math.pi))
    matrix = np.float32([[1, 0, distance * math.cos(angle)], [0, 1, distance * math.sin(angle)]])
    moved = cv2.warpAffine(
        image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
    )
    return _as_3d(moved).astype(np.float32)


@dataclass(frozen=True)
class Synthetic:
    """One synthetic anomaly: the altered crop, its region and how it was made."""

    image: np.ndarray
    mask: np.ndarray
    texture: str
    opacity: float


def synthesize(
    image: np.ndarray,
    config: SynthesisConfig,
    rng: np.random.Generator,
    foreground: np.ndarray | None = None,
) -> Synthetic:
    """Make ``image`` anomalous inside a Perlin or rectangular region.

    ``out = image * (1 - m) + (1 - beta) * texture * m + beta * image * m``, with ``m`` the
    region (restricted to ``foreground`` when given, its edge feathered when configured) and
    ``beta`` the opacity.

    Args:
        image: float32 ``(H, W)`` or ``(H, W, C)`` in ``[0, 1]``.
        config: synthesis settings.
        rng: the random source (seeded by the caller for reproducibility).
        foreground: optional float32 ``(H, W)`` in ``{0, 1}``: where Perlin regions may
            appear and rectangles may be centred.
    Returns:
        a :class:`Synthetic` whose ``image`` has the shape of ``image`` and whose ``mask`` is
        ``(H, W)``. The mask is all zero only if no region could be drawn in ``max_tries``.
    """
    squeeze = image.ndim == 2
    base = _as_3d(image.astype(np.float32))
    height, width = base.shape[:2]
    mask = np.zeros((height, width), np.float32)
    region = _choose(REGIONS, config.region_weights, rng)
    for _ in range(config.max_tries):
        if region == "rectangle":  # centred in the foreground, kept whole
            mask = rectangle_mask((height, width), config, rng, foreground)
        else:
            mask = perlin_mask((height, width), config, rng)
            if foreground is not None:
                mask = mask * foreground
        if mask.sum() > max(config.min_area_fraction * height * width, 0.0):
            break
    texture_name = _choose(TEXTURES, config.texture_weights, rng)
    if texture_name == "self":
        texture = self_texture(base, config.block_grid, rng)
    elif texture_name == "noise":
        texture = noise_texture(base.shape, rng)
    else:
        texture = shifted_texture(base, config.shift_fraction, rng, config.shift_near_axes)
    beta = float(rng.uniform(*config.opacity))
    m = feathered(mask, float(rng.uniform(*config.feather_px)))[..., None]
    out = base * (1.0 - m) + (1.0 - beta) * texture * m + beta * base * m
    out = out[..., 0] if squeeze else out
    return Synthetic(out.astype(np.float32), mask, texture_name, beta)


def feathered(mask: np.ndarray, sigma: float) -> np.ndarray:
    """``mask`` ``(H, W)`` with its edge blurred by ``sigma`` px; at least 0.5 inside it."""
    if sigma <= 0:
        return mask
    soft = cv2.GaussianBlur(mask, (0, 0), sigma)
    return np.where(mask > 0, np.maximum(soft, 0.5), soft).astype(np.float32)


def _choose(names: tuple[str, ...], weights: dict[str, float], rng: np.random.Generator) -> str:
    """One of ``names``, drawn with the relative ``weights`` (missing names weigh 0)."""
    kept = [name for name in names if weights.get(name, 0.0) > 0]
    if not kept:
        raise ValueError(f"no positive weight among {names}: {weights}")
    p = np.array([weights[name] for name in kept], dtype=np.float64)
    return str(rng.choice(kept, p=p / p.sum()))


def centre_foreground(shape: tuple[int, int], fraction: float = 0.7) -> np.ndarray:
    """An ellipse covering ``fraction`` of each axis, centred: where a centred fastener lies.

    Returns float32 ``(H, W)`` of 0 and 1.
    """
    height, width = shape
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ry, rx = fraction * height / 2.0, fraction * width / 2.0
    inside = ((yy - (height - 1) / 2.0) / ry) ** 2 + ((xx - (width - 1) / 2.0) / rx) ** 2 <= 1.0
    return inside.astype(np.float32)
