"""Scoring a replay's alarms against the known fasteners of its run."""

import json

import pytest

from edge.errors import ConfigInvalidError
from edge.pipeline.truth import inspected_span, load_truth, score_against_truth, truth_text


def fastener(rail, side, state, mileage_m):
    return {"rail": rail, "side": side, "state": state, "mileage_m": mileage_m}


def alarm(seq, rail, side, mileage_m):
    return {"seq": seq, "rail": rail, "side": side, "mileage_m": mileage_m, "along_track_m": 0}


FASTENERS = [
    fastener("left", "field", "missing", 100.0),
    fastener("left", "gauge", "normal", 100.0),
    fastener("right", "gauge", "displaced", 100.6),
    fastener("right", "field", "broken", 101.2),
] + [fastener("left", "field", "normal", 101.2 + 0.6 * i) for i in range(1, 7)]


def test_alarms_find_defects_on_the_same_rail_and_side_within_the_tolerance():
    alarms = [
        alarm(1, "left", "field", 100.4),  # finds the missing clip (0.4 m off)
        alarm(2, "left", "gauge", 100.0),  # a normal fastener: false alarm
        alarm(3, "right", "gauge", 101.7),  # displaced is 1.1 m away: false alarm, missed
        alarm(4, "right", "field", 101.2),  # finds the broken clip
        alarm(5, "right", "field", 101.3),  # the broken clip is taken by the nearer #4
    ]
    result = score_against_truth(alarms, FASTENERS, tolerance_m=1.0)
    assert result["defects"] == 3
    assert result["found"] == 2
    assert [defect["state"] for defect in result["missed"]] == ["displaced"]
    assert result["false_alarms"] == [2, 3, 5]
    assert result["normal_fasteners"] == 7
    assert result["false_alarms_per_100_normal"] == pytest.approx(300 / 7)
    text = truth_text(result)
    assert "2 of 3 defects found" in text
    assert "missed: displaced right rail gauge side at km 0 + 100.60 m" in text


def test_without_mileage_the_along_track_distance_is_used():
    fasteners = [{"rail": "left", "side": "field", "state": "missing", "along_track_m": 5.0}]
    alarms = [{"seq": 7, "rail": "left", "side": "field", "mileage_m": None, "along_track_m": 5.9}]
    assert score_against_truth(alarms, fasteners)["found"] == 1
    assert score_against_truth(alarms, fasteners, tolerance_m=0.5)["false_alarms"] == [7]


def test_a_bad_truth_file_names_the_file(tmp_path):
    good = tmp_path / "truth.json"
    good.write_text(json.dumps({"fasteners": FASTENERS}))
    assert load_truth(good) == FASTENERS
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"fasteners": [{"rail": "left", "side": "field"}]}))
    with pytest.raises(ConfigInvalidError, match="bad.json: not a truth file"):
        load_truth(bad)
    with pytest.raises(ConfigInvalidError, match="missing.json: cannot read"):
        load_truth(tmp_path / "missing.json")


def test_fasteners_beyond_the_inspected_stretch_are_neither_missed_nor_normal():
    truth = [
        fastener("left", "field", "normal", 100.0),
        fastener("left", "field", "missing", 100.6),
        fastener("right", "gauge", "normal", 101.2),
        fastener("right", "gauge", "broken", 101.5),  # 0.3 m past the last crop: cut off
        fastener("left", "gauge", "normal", 103.0),
    ]
    scores = [{"mileage_m": m, "along_track_m": m - 100} for m in (100.0, 100.6, 101.2)]
    span = inspected_span(scores)
    assert span == {"mileage_m": (100.0, 101.2), "along_track_m": (0.0, pytest.approx(1.2))}
    result = score_against_truth([alarm(1, "left", "field", 100.61)], truth, span=span)
    assert (result["defects"], result["found"], result["missed"]) == (1, 1, [])
    assert result["normal_fasteners"] == 2 and result["not_inspected"] == 2
    assert "2 fasteners of the truth lie beyond the stretch inspected" in truth_text(result)
    # Without the span the cut-off defect is missed and the far normal one is counted.
    plain = score_against_truth([alarm(1, "left", "field", 100.61)], truth)
    assert plain["missed"] == [truth[3]] and plain["normal_fasteners"] == 3
