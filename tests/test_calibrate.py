"""Fitting alarm thresholds: quantiles by hand, refusals, and the model check on reading."""

import numpy as np
import pytest

from edge.errors import CalibrationRefusedError, ConfigInvalidError
from edge.evaluate.calibrate import fit_threshold, min_crops
from edge.publisher.thresholds import Thresholds, load_thresholds


def test_minimum_crops_follows_the_false_alarm_rate():
    assert min_crops(0.01) == 100
    assert min_crops(0.005) == 200
    assert min_crops(0.1) == 50  # never under 50


def test_threshold_is_the_observed_score_at_the_quantile():
    scores = np.arange(1, 201, dtype=float) / 200.0  # 0.005 .. 1.0
    thresholds = fit_threshold(scores, 0.01, "abc123", "crops")
    # numpy's 'higher' 0.99 quantile of 200 values sits at index ceil(199 * 0.99) = 198, the
    # 199th score: one crop lies above it, within the 2 that 1 % of 200 allows.
    assert thresholds.threshold == pytest.approx(0.995)
    assert int((scores > thresholds.threshold).sum()) == 1
    assert thresholds.crops == 200
    assert thresholds.min_crops == 100
    assert thresholds.scores.maximum == pytest.approx(1.0)
    assert thresholds.is_alarm(0.996) and not thresholds.is_alarm(0.995)


def test_too_few_crops_are_refused_naming_the_minimum():
    with pytest.raises(CalibrationRefusedError, match="at least 100"):
        fit_threshold(np.linspace(0, 1, 99), 0.01, "abc123", "my-crops")


def test_scores_that_are_not_finite_do_not_count():
    scores = np.r_[np.linspace(0, 1, 99), np.nan, np.inf]
    with pytest.raises(CalibrationRefusedError, match="99 normal crops"):
        fit_threshold(scores, 0.01, "abc123", "crops")


def test_thresholds_file_round_trips_and_refuses_another_model(tmp_path):
    path = tmp_path / "cam0.thresholds.json"
    fit_threshold(np.linspace(0, 1, 150), 0.01, "model-a", "crops").save(path)
    assert load_thresholds(path, "model-a") == Thresholds.load(path)
    with pytest.raises(ConfigInvalidError, match="model-a"):
        load_thresholds(path, "model-b")
