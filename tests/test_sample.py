"""The README's first command, checked: the shipped model on the bundled sample run.

``samples/track-demo`` is a run made from real track photographs with seven fasteners edited
to be missing, displaced or broken (its README); ``engines/`` holds the shipped model and
``calibration/demo-vehicle/`` the camera's geometry and threshold. The replay must raise an
alarm for every edited fastener (same rail and side, within 1 m).

Known limit, asserted as measured so that a change is seen: the goal is at most one false alarm
per 100 normal fasteners, and the shipped model raises two on the 93 normal ones (2.2 per 100),
both on clips half covered by ballast stones (km 27 + 422.45 left field, 425.44 right field).
The threshold is fitted for 1 % of normal crops on the holdout scenes; on the unseen test scenes
the same threshold flags about 5 % (README, accuracy).
"""

import json
import subprocess
from pathlib import Path

import pytest
from pipeline_support import replay_command

from edge.engine.metadata import read_metadata
from edge.pipeline.replay import default_model
from edge.publisher.thresholds import load_thresholds

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "track-demo"


def test_the_shipped_threshold_was_fitted_for_the_shipped_model():
    model = REPO / default_model(Path("engines"))
    metadata = read_metadata(model)
    thresholds = load_thresholds(
        REPO / "calibration" / "demo-vehicle" / "cam0.thresholds.json", metadata.model_id
    )
    assert thresholds.crops >= thresholds.min_crops
    assert model.stat().st_size + model.with_suffix(".pt").stat().st_size < 20 * 2**20


@pytest.mark.slow
def test_the_sample_replay_finds_every_edited_fastener_and_few_false_alarms(tmp_path):
    done = subprocess.run(
        replay_command(
            str(SAMPLE / "run.mkv"),
            "--json",
            "--truth",
            str(SAMPLE / "truth.json"),
            "--report",
            str(tmp_path / "report"),
        ),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    truth = summary["truth"]
    assert summary["crops"] == 100
    assert truth["defects"] == 7
    assert truth["found"] == 7, truth["missed"]
    assert len(truth["false_alarms"]) <= 2, truth["false_alarms"]
    assert (tmp_path / "report" / "index.html").is_file()
