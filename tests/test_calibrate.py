"""Fitting alarm thresholds: quantiles by hand, refusals, and the model check on reading."""

import json
from pathlib import Path

import numpy as np
import pytest

from edge.errors import CalibrationRefusedError, ConfigInvalidError, ExitStatus
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


def test_edge_calibrate_pools_the_scores_of_several_folders(tmp_path, capsys):
    import cv2
    import torch

    from edge.cli import main
    from edge.evaluate.calibrate import score_folder
    from edge.model import DiffFastener, preset
    from edge.model.checkpoint import save_checkpoint

    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.pt"
    model_id = save_checkpoint(checkpoint, DiffFastener(preset("tiny")).eval())
    rng = np.random.default_rng(3)
    folders = []
    for name, count in [("scene-a", 30), ("scene-b", 25)]:
        folder = tmp_path / name
        folder.mkdir()
        for index in range(count):
            crop = rng.integers(0, 256, size=(32, 32), dtype=np.uint8)
            cv2.imwrite(str(folder / f"{index:03d}.png"), crop)
        folders.append(folder)
    out = tmp_path / "cam0.thresholds.json"
    argv = ["calibrate", str(checkpoint), *map(str, folders), "--false-alarm-rate", "0.02"]
    assert main([*argv, "--out", str(out)]) == 0
    capsys.readouterr()

    # The fit is the 0.98 quantile of the 55 scores of both folders, scored one by one here.
    pooled = np.concatenate([score_folder(checkpoint, folder, "torch")[0] for folder in folders])
    thresholds = Thresholds.load(out)
    assert thresholds.crops == 55 and thresholds.model_id == model_id
    assert thresholds.threshold == pytest.approx(np.quantile(pooled, 0.98, method="higher"))
    assert thresholds.data_dir == f"{folders[0]}, {folders[1]}"
    # Either folder alone holds fewer than the 50 crops the fit needs.
    status = main([*argv[:2], str(folders[1]), "--false-alarm-rate", "0.02", "--out", str(out)])
    assert status == ExitStatus.CALIBRATION_REFUSED
    assert "scene-b: 25 normal crops" in capsys.readouterr().err


def test_edge_calibrate_without_a_camera_or_out_file_writes_nothing(tmp_path, capsys):
    from edge.cli import main

    status = main(["calibrate", "model.onnx", str(tmp_path), "--calibration-dir", str(tmp_path)])
    assert status == 2
    assert "--vehicle and --camera" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", ["--vehicle", "--camera"])
@pytest.mark.parametrize("bad", ["bad vehicle/..", "../cam0", ".hidden", ""])
def test_edge_calibrate_refuses_an_id_that_is_no_file_name(tmp_path, capsys, option, bad):
    from edge.cli import main

    ids = {"--vehicle": "TIV-1", "--camera": "cam0", option: bad}
    argv = ["calibrate", "model.onnx", str(tmp_path), "--calibration-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as caught:
        main([*argv, *(item for pair in ids.items() for item in pair)])
    assert caught.value.code == 2
    assert f"argument {option}: {bad!r} is not an id: letters, digits" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [-0.5, float("nan")])
def test_a_thresholds_file_with_a_threshold_no_score_can_have_is_refused(tmp_path, bad):
    path = tmp_path / "cam0.thresholds.json"
    thresholds = fit_threshold(np.linspace(0, 1, 150), 0.01, "model-a", "crops")
    thresholds.model_copy(update={"threshold": bad}).save(path)
    with pytest.raises(ConfigInvalidError, match="cam0.thresholds.json"):
        load_thresholds(path, "model-a")


@pytest.mark.parametrize(("bad", "shown"), [("0.8", "'0.8'"), (True, "True")])
def test_a_threshold_that_is_not_a_number_in_the_file_is_refused(tmp_path, bad, shown):
    path = tmp_path / "cam0.thresholds.json"
    thresholds = fit_threshold(np.linspace(0, 1, 150), 0.01, "model-a", "crops")
    data = json.loads(thresholds.to_json())
    data["threshold"] = bad
    path.write_text(json.dumps(data))
    expected = f"cam0.thresholds.json: threshold: Input should be a valid number \\(got {shown}\\)"
    with pytest.raises(ConfigInvalidError, match=expected):
        load_thresholds(path, "model-a")


def _last_error_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.timeout(30)
def test_edge_calibrate_checks_the_out_file_before_scoring(tmp_path, capsys, monkeypatch):
    from edge.cli import main
    from edge.evaluate import calibrate

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored before the --out file was checked")

    monkeypatch.setattr(calibrate, "score_folder", no_scoring)
    (tmp_path / "crops").mkdir()
    argv = ["calibrate", "model.pt", str(tmp_path / "crops"), "--out"]
    assert main([*argv, str(tmp_path)]) == ExitStatus.CONFIG_INVALID
    assert _last_error_line(capsys) == (
        f"edge calibrate: {tmp_path}: a folder, not a file (--out names the file to write)"
    )
    if Path("/proc").is_dir():
        assert main([*argv, "/proc/nope/x.json"]) == ExitStatus.CONFIG_INVALID
        assert _last_error_line(capsys).startswith(
            "edge calibrate: /proc/nope/x.json: cannot be written (no file can be made in /proc: "
        )
    assert not Path("/proc/nope").exists()


@pytest.mark.timeout(30)
def test_edge_calibrate_says_a_folder_is_no_model_and_a_file_no_crop_folder(tmp_path, capsys):
    import torch

    from edge.cli import main
    from edge.model import DiffFastener, preset
    from edge.model.checkpoint import save_checkpoint

    out = str(tmp_path / "cam0.thresholds.json")
    crops = tmp_path / "crops"
    crops.mkdir()
    assert main(["calibrate", str(tmp_path), str(crops), "--out", out]) == ExitStatus.MODEL_INVALID
    assert _last_error_line(capsys) == (
        f"edge calibrate: {tmp_path}: a folder, not a checkpoint file (.pt)"
    )
    graph_folder = tmp_path / "model.onnx"
    graph_folder.mkdir()
    assert (
        main(["calibrate", str(graph_folder), str(crops), "--out", out]) == ExitStatus.MODEL_INVALID
    )
    assert _last_error_line(capsys) == (
        f"edge calibrate: {graph_folder}: a folder, not an ONNX graph file (.onnx)"
    )
    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(checkpoint, DiffFastener(preset("tiny")).eval())
    status = main(["calibrate", str(checkpoint), str(checkpoint), "--out", out])
    assert status == ExitStatus.INPUT_UNREADABLE
    assert _last_error_line(capsys) == f"edge calibrate: {checkpoint}: a file, not a folder"


def _no_scoring(*args, **kwargs):
    raise AssertionError("scored before the folders were checked")


@pytest.mark.timeout(30)
def test_edge_calibrate_refuses_a_folder_read_as_its_training_split(tmp_path, capsys, monkeypatch):
    from edge.cli import main
    from edge.evaluate import calibrate

    monkeypatch.setattr(calibrate, "score_folder", _no_scoring)
    # The layout of edge prepare-crops, and an MVTec AD category without a holdout.
    data, category = tmp_path / "data", tmp_path / "bottle"
    for folder in ("train/good", "test/good", "holdout/test/good"):
        (data / folder).mkdir(parents=True)
    for folder in ("train/good", "test/good"):
        (category / folder).mkdir(parents=True)
    out = ["--out", str(tmp_path / "cam0.thresholds.json")]
    held_out = f"{data}/holdout/test/good or {data}/test/good"
    for given, train, instead in [
        (data, data / "train/good", held_out),
        (data / "train" / "good", data / "train/good", held_out),
        (category, category / "train/good", f"{category}/test/good"),
    ]:
        assert main(["calibrate", "model.pt", str(given), *out]) == ExitStatus.USAGE
        assert _last_error_line(capsys) == (
            f"edge calibrate: {given}: its normal crops would come from {train}, the training "
            f"split; give normal crops not used in training: {instead}"
        )
    lone = tmp_path / "crops" / "train" / "good"
    lone.mkdir(parents=True)
    assert main(["calibrate", "model.pt", str(lone), *out]) == ExitStatus.USAGE
    assert _last_error_line(capsys) == (
        f"edge calibrate: {lone}: its normal crops would come from {lone}, the training split; "
        "give a folder of normal crops not used in training"
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bottle", "crops", "data"]

    # The held-out folders are taken.
    def scores(model_path, data_dir, backend_name):
        return np.linspace(0.0, 1.0, 60), "model-a"

    monkeypatch.setattr(calibrate, "score_folder", scores)
    argv = ["calibrate", "model.pt", str(data / "holdout/test/good"), str(category / "test/good")]
    assert main([*argv, *out]) == 0
    assert Thresholds.load(tmp_path / "cam0.thresholds.json").crops == 120


@pytest.mark.timeout(30)
def test_edge_calibrate_refuses_a_folder_given_twice(tmp_path, capsys, monkeypatch):
    from edge.cli import main
    from edge.evaluate import calibrate

    monkeypatch.setattr(calibrate, "score_folder", _no_scoring)
    crops, other = tmp_path / "crops", tmp_path / "other"
    crops.mkdir()
    other.mkdir()
    out = ["--out", str(tmp_path / "cam0.thresholds.json")]
    argv = ["calibrate", "model.pt", str(crops), str(other)]
    assert main([*argv, str(crops), *out]) == ExitStatus.USAGE
    assert _last_error_line(capsys) == (
        f"edge calibrate: {crops}: given twice; its crops would count twice towards the minimum"
    )
    again = other / ".." / "crops"
    assert main([*argv, str(again), *out]) == ExitStatus.USAGE
    assert _last_error_line(capsys) == (
        f"edge calibrate: {again}: the same folder as {crops}; its crops would count twice "
        "towards the minimum"
    )
    assert sorted(tmp_path.iterdir()) == [crops, other]
