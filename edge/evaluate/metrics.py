"""Detection and localisation metrics: image and pixel AUROC, AU-PRO, F1-max, precision/recall.

Everything here is plain numpy/scipy/scikit-learn on arrays, and returns values; nothing is
printed or logged. Conventions shared by every function:

- ``labels`` are 0 (normal) or 1 (anomalous); ``masks`` are 0 (normal pixel) or non-zero
  (defect pixel); a higher score or map value means "more anomalous".
- At the F1-max threshold a crop is called anomalous when ``score >= threshold`` (the
  convention of scikit-learn's ``precision_recall_curve``, whose thresholds F1-max returns).
  At a threshold given from outside (a camera's calibration) it is ``score > threshold``, as
  the pipeline raises alarms: a calibrated threshold is itself a normal crop's score.
- A metric that is undefined for the data (an AUROC with only one class present, an AU-PRO
  with no defect region) is ``nan``, never an exception, so one missing class does not stop an
  evaluation; callers turn ``nan`` into ``null`` in JSON.

AU-PRO follows the official MVTec AD evaluation code (``pro_curve_util.py`` and
``generic_util.py`` of MVTec's ``mvtec_ad_evaluation``, Bergmann and Sattlegger, 2021), as
summarised in research/model-anchors.md section 5.1. Known limit: the official protocol wants
anomaly maps at the ground truth's full resolution; ``edge eval`` scores crops at the model's
input size and resizes the masks to it (nearest), so small defects can shrink or vanish and the
figure is not directly comparable to published MVTec numbers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

DEFAULT_FPR_LIMIT = 0.3
"""AU-PRO integrates the PRO curve up to this false-positive rate (MVTec's standard)."""

_EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


def _has_both_classes(labels: np.ndarray) -> bool:
    return bool(labels.size) and labels.min() != labels.max()


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of image scores.

    Args:
        labels: ``(n_images,)`` 0 normal, 1 anomalous.
        scores: ``(n_images,)`` image scores.
    Returns:
        AUROC in ``[0, 1]`` (ties count one half), or ``nan`` when only one class is present.
    """
    labels = np.asarray(labels).ravel().astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in shape")
    if not _has_both_classes(labels):
        return math.nan
    return float(roc_auc_score(labels, scores))


def pixel_auroc(masks: np.ndarray, anomaly_maps: np.ndarray) -> float:
    """Pixel AUROC: all pixels of all images pooled into one ROC.

    Args:
        masks: ``(n_images, height, width)``, non-zero where a pixel is defective.
        anomaly_maps: same shape, per-pixel scores.
    Returns:
        AUROC, or ``nan`` when the masks hold only defect or only normal pixels.
    """
    masks = np.asarray(masks)
    anomaly_maps = np.asarray(anomaly_maps)
    if masks.shape != anomaly_maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {anomaly_maps.shape} differ in shape")
    return image_auroc((masks.ravel() > 0).astype(np.int64), anomaly_maps.ravel())


@dataclass(frozen=True)
class ProCurve:
    """The FPR-PRO curve of a set of anomaly maps, one point per distinct map value.

    ``fpr`` and ``pro`` are ``(n_points,)``, non-decreasing, starting at ``(0, 0)`` and ending
    at ``(1, 1)``. ``num_regions`` counts the 8-connected defect regions of all masks and
    ``num_normal_pixels`` the defect-free pixels of all images, normal images included.
    """

    fpr: np.ndarray
    pro: np.ndarray
    num_regions: int
    num_normal_pixels: int


def pro_curve(anomaly_maps: np.ndarray, masks: np.ndarray) -> ProCurve:
    """The exact PRO curve by the official MVTec definition (model-anchors.md section 5.1).

    Args:
        anomaly_maps: ``(n_images, height, width)`` per-pixel scores.
        masks: same shape; non-zero marks a defect pixel.
    Returns:
        :class:`ProCurve`. With no defect region or no normal pixel the curve is just
        ``(0, 0), (1, 1)`` and the counts tell why.
    """
    anomaly_maps = np.asarray(anomaly_maps, dtype=np.float64)
    masks = np.asarray(masks) > 0
    if anomaly_maps.ndim == 2:
        anomaly_maps, masks = anomaly_maps[None], masks[None]
    if anomaly_maps.shape != masks.shape or anomaly_maps.ndim != 3:
        raise ValueError(
            f"need maps and masks of one shape (n, h, w); got {anomaly_maps.shape}, {masks.shape}"
        )

    # 1. Label each mask's 8-connected defect regions; the region count is a global total.
    fp_change = np.zeros(masks.shape, dtype=np.float64)
    pro_change = np.zeros(masks.shape, dtype=np.float64)
    num_regions = 0
    for index, mask in enumerate(masks):
        regions, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        num_regions += count
        # 2. A normal pixel moves the FPR by one; a defect pixel moves its region's overlap
        #    by 1/|region|, so the running sum over regions is the sum of per-region overlaps.
        fp_change[index][~mask] = 1.0
        if count:
            sizes = np.bincount(regions.ravel())
            pro_change[index][mask] = 1.0 / sizes[regions[mask]]
    num_normal_pixels = int(fp_change.sum())
    if num_regions == 0 or num_normal_pixels == 0:
        unit = np.array([0.0, 1.0])
        return ProCurve(unit, unit.copy(), num_regions, num_normal_pixels)

    # 3. Lower the threshold through every map value: sort descending and accumulate.
    order = np.argsort(anomaly_maps.ravel(), kind="stable")[::-1]
    sorted_scores = anomaly_maps.ravel()[order]
    fpr = np.cumsum(fp_change.ravel()[order]) / num_normal_pixels
    pro = np.cumsum(pro_change.ravel()[order]) / num_regions

    # 4. Equal scores pass the threshold together: keep only the last point of each run.
    last_of_run = np.append(np.diff(sorted_scores) != 0, True)
    fpr = np.minimum(fpr[last_of_run], 1.0)
    pro = np.minimum(pro[last_of_run], 1.0)
    fpr = np.concatenate([[0.0], fpr, [1.0]])
    pro = np.concatenate([[0.0], pro, [1.0]])
    return ProCurve(fpr, pro, num_regions, num_normal_pixels)


def area_under_curve(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under ``y(x)`` from ``x[0]`` to ``x_max``.

    ``x`` must be sorted ascending (repeated values allowed). When ``x_max`` falls between two
    samples, ``y(x_max)`` is interpolated linearly and the partial trapezoid is added. Points
    with a non-finite coordinate are dropped.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    if x.size < 2:
        return math.nan
    inside = x <= x_max
    area = float(np.sum(0.5 * np.diff(x[inside]) * (y[inside][1:] + y[inside][:-1])))
    if x_max > x[inside][-1] and not inside.all():
        # x_max lies strictly between the last sample inside and the first one beyond it.
        beyond = int(np.argmax(~inside))
        x0, x1, y0, y1 = x[beyond - 1], x[beyond], y[beyond - 1], y[beyond]
        y_at_limit = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (x_max - x0) * (y0 + y_at_limit)
    return area


def aupro(
    anomaly_maps: np.ndarray, masks: np.ndarray, fpr_limit: float = DEFAULT_FPR_LIMIT
) -> float:
    """Area under the PRO curve up to ``fpr_limit``, divided by ``fpr_limit``; in ``[0, 1]``.

    Args:
        anomaly_maps: ``(n_images, height, width)``.
        masks: same shape; non-zero marks a defect pixel. Include the normal images: their
            pixels count in the false-positive rate.
        fpr_limit: upper end of the integration, in ``(0, 1]``.
    Returns:
        AU-PRO, or ``nan`` when there is no defect region or no normal pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    curve = pro_curve(anomaly_maps, masks)
    if curve.num_regions == 0 or curve.num_normal_pixels == 0:
        return math.nan
    return area_under_curve(curve.fpr, curve.pro, fpr_limit) / fpr_limit


@dataclass(frozen=True)
class ThresholdResult:
    """Precision, recall and F1 of the decision at ``threshold``, with its counts."""

    threshold: float
    precision: float
    recall: float
    f1: float
    true_positives: int
    false_positives: int
    false_negatives: int
    true_negatives: int


def precision_recall_at(
    labels: np.ndarray, scores: np.ndarray, threshold: float, strict: bool = False
) -> ThresholdResult:
    """Precision and recall when crops with ``score >= threshold`` (``strict``: ``>``) are
    called anomalous.

    Args:
        labels: ``(n_images,)`` 0 normal, 1 anomalous.
        scores: ``(n_images,)``.
        threshold: decision threshold in the units of ``scores``.
    Returns:
        :class:`ThresholdResult`; precision is ``nan`` when nothing is called anomalous,
        recall is ``nan`` when there is no anomalous crop.
    """
    labels = np.asarray(labels).ravel() > 0
    scores = np.asarray(scores, dtype=np.float64).ravel()
    called = scores > threshold if strict else scores >= threshold
    tp = int(np.sum(called & labels))
    fp = int(np.sum(called & ~labels))
    fn = int(np.sum(~called & labels))
    tn = int(np.sum(~called & ~labels))
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / (tp + fn) if tp + fn else math.nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan
    return ThresholdResult(float(threshold), precision, recall, f1, tp, fp, fn, tn)


@dataclass(frozen=True)
class F1Max:
    """The best F1 over all thresholds of the precision-recall curve, and where it is reached."""

    f1: float
    threshold: float
    precision: float
    recall: float


def f1_max(labels: np.ndarray, scores: np.ndarray) -> F1Max:
    """Highest F1 over every threshold that is one of the scores.

    Args:
        labels: ``(n_images,)`` 0 normal, 1 anomalous.
        scores: ``(n_images,)``.
    Returns:
        :class:`F1Max`; the threshold is the lowest score that still reaches the best F1
        (``score >= threshold`` is anomalous). All ``nan`` without both classes.
    """
    labels = np.asarray(labels).ravel().astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if not _has_both_classes(labels):
        return F1Max(math.nan, math.nan, math.nan, math.nan)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    # The last PR point (precision 1, recall 0) has no threshold; leave it out.
    precision, recall = precision[:-1], recall[:-1]
    denominator = precision + recall
    f1 = np.divide(
        2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0
    )
    best = int(np.argmax(f1))
    return F1Max(
        float(f1[best]), float(thresholds[best]), float(precision[best]), float(recall[best])
    )


@dataclass(frozen=True)
class DetectionMetrics:
    """Everything ``edge eval`` reports for one scorer (the model or the baseline).

    Pixel metrics are ``None`` when the data set has no masks; undefined values are ``nan``.
    ``image_auroc`` uses the scorer's image score (top-k mean for Diff-Fastener);
    ``image_auroc_map_max`` scores each image by the maximum of its map, as the official MVTec
    script does. ``threshold`` is the one precision and recall were taken at.
    """

    num_images: int
    num_anomalous: int
    image_auroc: float
    image_auroc_map_max: float
    pixel_auroc: float | None
    aupro: float | None
    aupro_fpr_limit: float
    f1_max: float
    f1_max_threshold: float
    threshold: float
    alarm_when: str  # "score > threshold" (a given threshold) or "score >= threshold" (F1-max)
    precision: float
    recall: float
    per_defect_image_auroc: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-ready dict: ``nan`` becomes ``None``."""

        def clean(value):
            if isinstance(value, dict):
                return {key: clean(item) for key, item in value.items()}
            if isinstance(value, float) and not math.isfinite(value):
                return None
            return value

        return clean(asdict(self))


def per_defect_image_auroc(
    labels: np.ndarray, scores: np.ndarray, defect_types: list[str]
) -> dict[str, float]:
    """Image AUROC of each defect type against all normal images.

    Args:
        labels: ``(n_images,)``; 0 marks the normal images every type is compared with.
        scores: ``(n_images,)``.
        defect_types: one name per image; the names of anomalous images define the types.
    Returns:
        ``{defect_type: auroc}``, sorted by name; ``nan`` when there is no normal image.
    """
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    types = np.asarray(defect_types)
    normal = labels == 0
    result = {}
    for name in sorted(set(types[labels > 0].tolist())):
        chosen = normal | ((types == name) & (labels > 0))
        result[name] = image_auroc(labels[chosen], scores[chosen])
    return result


def detection_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    anomaly_maps: np.ndarray,
    masks: np.ndarray | None = None,
    defect_types: list[str] | None = None,
    threshold: float | None = None,
    fpr_limit: float = DEFAULT_FPR_LIMIT,
) -> DetectionMetrics:
    """All metrics of one scorer on one labelled set.

    Args:
        labels: ``(n_images,)`` 0 normal, 1 anomalous.
        scores: ``(n_images,)`` image scores.
        anomaly_maps: ``(n_images, height, width)``.
        masks: ``(n_images, height, width)`` or ``None`` (no pixel metrics).
        defect_types: one name per image for the per-type AUROC, or ``None``.
        threshold: where to take precision and recall; ``None`` takes the F1-max threshold.
        fpr_limit: AU-PRO integration limit.
    """
    labels = np.asarray(labels).ravel().astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    anomaly_maps = np.asarray(anomaly_maps)
    best = f1_max(labels, scores)
    strict = threshold is not None
    if threshold is None:
        threshold = best.threshold
    at_threshold = precision_recall_at(labels, scores, threshold, strict=strict)
    map_max = anomaly_maps.reshape(len(anomaly_maps), -1).max(axis=1)
    return DetectionMetrics(
        num_images=int(labels.size),
        num_anomalous=int(labels.sum()),
        image_auroc=image_auroc(labels, scores),
        image_auroc_map_max=image_auroc(labels, map_max),
        pixel_auroc=None if masks is None else pixel_auroc(masks, anomaly_maps),
        aupro=None if masks is None else aupro(anomaly_maps, masks, fpr_limit),
        aupro_fpr_limit=float(fpr_limit),
        f1_max=best.f1,
        f1_max_threshold=best.threshold,
        threshold=float(threshold),
        alarm_when="score > threshold" if strict else "score >= threshold",
        precision=at_threshold.precision,
        recall=at_threshold.recall,
        per_defect_image_auroc=(
            {} if defect_types is None else per_defect_image_auroc(labels, scores, defect_types)
        ),
    )
