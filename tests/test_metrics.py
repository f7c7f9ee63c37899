"""Metrics against the MVTec AU-PRO reference vector, hand-computed values and brute force."""

import math

import numpy as np
import pytest
from scipy.stats import mannwhitneyu
from sklearn.metrics import roc_auc_score

from edge.evaluate.metrics import (
    area_under_curve,
    aupro,
    detection_metrics,
    f1_max,
    image_auroc,
    per_defect_image_auroc,
    pixel_auroc,
    precision_recall_at,
    pro_curve,
)

# research/model-anchors.md section 5.4: one 400 x 7 map holding k / 2800 row-major.
REFERENCE_MAP = (np.arange(2800, dtype=np.float64) / 2800).reshape(400, 7)


def _columns_mask(columns):
    mask = np.zeros((400, 7), dtype=np.uint8)
    mask[:, columns] = 1
    return mask


MASK_A = _columns_mask([3])
MASK_B = _columns_mask([1, 3, 5])


@pytest.mark.parametrize(
    "maps, masks",
    [
        (REFERENCE_MAP[None], MASK_A[None]),
        (REFERENCE_MAP[None], MASK_B[None]),
        (np.stack([REFERENCE_MAP, REFERENCE_MAP]), np.stack([MASK_A, MASK_B])),
    ],
    ids=["column-3", "columns-1-3-5", "both-together"],
)
def test_aupro_of_the_reference_map_is_one_sixth(maps, masks):
    assert aupro(maps, masks, fpr_limit=1 / 3) == pytest.approx(1 / 6, abs=1e-3)


def test_aupro_of_a_perfect_map_is_one():
    masks = np.zeros((3, 12, 12), dtype=np.uint8)
    masks[0, 2:5, 3:9] = 1
    masks[1, 7:11, 1:3] = 1
    masks[1, 0, 11] = 1  # a one-pixel region beside a large one
    perfect = masks.astype(np.float64)
    assert aupro(perfect, masks) == pytest.approx(1.0, abs=1e-9)
    # And the worst map (defects score lowest) reaches nothing before FPR 0.3.
    assert aupro(1.0 - perfect, masks) == pytest.approx(0.0, abs=1e-9)


def test_regions_are_8_connected_and_normal_images_count_in_the_fpr():
    masks = np.zeros((2, 5, 5), dtype=np.uint8)
    masks[0, 1, 1] = masks[0, 2, 2] = 1  # touch at a corner: one region
    masks[0, 4, 4] = 1  # a second region
    curve = pro_curve(np.zeros((2, 5, 5)), masks)
    assert curve.num_regions == 2
    assert curve.num_normal_pixels == 50 - 3  # the all-normal second image included


def _brute_force_aupro(maps, masks, fpr_limit):
    """Threshold by threshold, straight from the definition (independent of the sort trick)."""
    from scipy import ndimage

    regions = []
    for index, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(index, labelled == r) for r in range(1, count + 1)]
    normal = masks == 0
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        called = maps >= threshold
        fprs.append((called & normal).sum() / normal.sum())
        pros.append(np.mean([called[i][region].mean() for i, region in regions]))
    fprs, pros = np.array(fprs + [1.0]), np.array(pros + [1.0])
    inside = fprs <= fpr_limit
    grid = np.append(fprs[inside], fpr_limit)
    values = np.interp(grid, fprs, pros)
    return np.trapezoid(values, grid) / fpr_limit


def test_aupro_matches_a_brute_force_threshold_sweep_with_ties():
    rng = np.random.default_rng(7)
    masks = np.zeros((4, 16, 16), dtype=np.uint8)
    masks[0, 3:7, 4:12] = 1
    masks[1, 10:15, 2:5] = 1
    masks[1, 1:3, 13:15] = 1
    masks[2, 8, 8] = 1  # image 3 stays normal
    # Defects score higher on average; values quantised to 20 levels so many pixels tie.
    maps = np.round((rng.random(masks.shape) + 0.6 * masks) * 12) / 20
    for limit in (0.05, 0.3, 1.0):
        assert aupro(maps, masks, limit) == pytest.approx(
            _brute_force_aupro(maps, masks, limit), abs=1e-9
        )


def test_aupro_is_nan_without_a_defect_region():
    assert math.isnan(aupro(np.random.default_rng(0).random((2, 4, 4)), np.zeros((2, 4, 4))))


def test_trapezoid_interpolates_at_the_limit():
    # 0..0.2: 0.5 * 0.2 * (0 + 0.4) = 0.04; y(0.3) = 0.5; 0.2..0.3: 0.5 * 0.1 * 0.9 = 0.045.
    x = np.array([0.0, 0.2, 0.5, 1.0])
    y = np.array([0.0, 0.4, 0.7, 1.0])
    assert area_under_curve(x, y, 0.3) == pytest.approx(0.085, abs=1e-12)
    assert area_under_curve(x, y, 0.2) == pytest.approx(0.04, abs=1e-12)


def test_image_auroc_hand_example_with_a_tie():
    # positives 0.5, 0.7, 0.1 against negatives 0.2, 0.5: 1 + 0.5 + 2 + 0 = 3.5 of 6 pairs.
    assert image_auroc([0, 0, 1, 1, 1], [0.2, 0.5, 0.5, 0.7, 0.1]) == pytest.approx(7 / 12)


def test_image_auroc_agrees_with_scikit_learn_and_mann_whitney():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(size=200) + 0.8 * labels, 1)  # rounded: ties
    value = image_auroc(labels, scores)
    assert value == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    u = mannwhitneyu(scores[labels == 1], scores[labels == 0]).statistic
    assert value == pytest.approx(u / (labels.sum() * (labels == 0).sum()), abs=1e-12)
    assert 0.6 < value < 0.9


def test_pixel_auroc_pools_all_pixels_of_all_images():
    masks = np.array([[[0, 1, 0]], [[0, 1, 0]]])
    maps = np.array([[[0.1, 0.9, 0.4]], [[0.95, 0.6, 0.7]]])
    # Pooled: 0.9 beats 0.1, 0.4, 0.7; 0.6 beats 0.1, 0.4 -> 5 of 8. (Per image mean: 0.5.)
    assert pixel_auroc(masks, maps) == pytest.approx(5 / 8)
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))


LABELS = [0, 0, 1, 1, 0, 1]
SCORES = [0.1, 0.4, 0.35, 0.8, 0.2, 0.9]


def test_f1_max_hand_example():
    # Lowering the threshold: 0.9 -> F1 1/2, 0.8 -> 4/5, 0.4 -> 2/3, 0.35 -> 6/7, 0.2 -> 3/4.
    best = f1_max(LABELS, SCORES)
    assert best.f1 == pytest.approx(6 / 7)
    assert best.threshold == pytest.approx(0.35)
    assert (best.precision, best.recall) == pytest.approx((0.75, 1.0))


def test_precision_recall_at_a_threshold_counts_equal_scores_as_anomalous():
    at = precision_recall_at(LABELS, SCORES, 0.4)  # calls 0.4 (normal), 0.8, 0.9
    counts = (at.true_positives, at.false_positives, at.false_negatives, at.true_negatives)
    assert counts == (2, 1, 1, 2)
    assert (at.precision, at.recall) == pytest.approx((2 / 3, 2 / 3))
    nothing = precision_recall_at(LABELS, SCORES, 5.0)
    assert math.isnan(nothing.precision) and nothing.recall == 0.0
    # A calibrated threshold is a normal crop's score; the pipeline alarms strictly above it.
    strict = precision_recall_at(LABELS, SCORES, 0.4, strict=True)  # calls 0.8, 0.9
    assert (strict.true_positives, strict.false_positives) == (2, 0)
    assert (strict.precision, strict.recall) == pytest.approx((1.0, 2 / 3))


def test_single_class_gives_nan_not_an_error():
    assert math.isnan(image_auroc([0, 0, 0], [0.1, 0.2, 0.3]))
    assert math.isnan(f1_max([1, 1], [0.1, 0.2]).f1)


def test_per_defect_auroc_compares_each_type_with_the_normal_images():
    labels = [0, 0, 1, 1, 1, 1]
    scores = [0.1, 0.2, 0.3, 0.15, 0.05, 0.9]
    types = ["good", "good", "cut", "cut", "hole", "hole"]
    # cut: 0.3 beats both normals, 0.15 beats 0.1 -> 3/4; hole: 0.9 beats both -> 2/4.
    assert per_defect_image_auroc(labels, scores, types) == pytest.approx(
        {"cut": 0.75, "hole": 0.5}
    )


def test_detection_metrics_use_the_given_threshold_and_clean_nan_for_json():
    maps = np.zeros((6, 2, 2))
    metrics = detection_metrics(LABELS, SCORES, maps, threshold=0.4)
    assert metrics.threshold == 0.4 and metrics.f1_max_threshold == pytest.approx(0.35)
    # Strictly above a given threshold, as the pipeline alarms: 0.8 and 0.9, not 0.4 itself.
    assert metrics.alarm_when == "score > threshold"
    assert (metrics.precision, metrics.recall) == pytest.approx((1.0, 2 / 3))
    assert detection_metrics(LABELS, SCORES, maps).alarm_when == "score >= threshold"
    assert metrics.pixel_auroc is None and metrics.aupro is None
    # All-zero maps cannot rank the images: the max-of-map AUROC is one half.
    assert metrics.image_auroc_map_max == pytest.approx(0.5)
    cleaned = detection_metrics([0, 0], [0.1, 0.2], np.zeros((2, 2, 2))).to_dict()
    assert cleaned["image_auroc"] is None and cleaned["f1_max"] is None
