"""Loaders, folds, the z-score baseline, heatmaps and ``edge eval`` end to end, on small
generated folders."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from edge.errors import ConfigInvalidError, ExitStatus, InputUnreadableError
from edge.evaluate.baseline import ZScoreBaseline
from edge.evaluate.datasets import (
    detect_layout,
    load_image,
    load_normal_images,
    load_test_set,
    stratified_folds,
)
from edge.evaluate.heatmaps import overlay_png, write_panels
from edge.evaluate.run import evaluate, read_calibration_threshold

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


def _fastener(rng: np.random.Generator, size: int = 40) -> np.ndarray:
    """A grey, slightly noisy 'clip': a bright bar on a dark plate, as BGR uint8."""
    grey = np.full((size, size), 60, dtype=np.float64)
    grey[size // 3 : 2 * size // 3, size // 6 : 5 * size // 6] = 180
    grey += rng.normal(0, 3, grey.shape)
    grey = np.clip(grey, 0, 255).astype(np.uint8)
    return cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)


def _make_mvtec(root: Path, normals: int = 3, goods: int = 3, defects: int = 3) -> Path:
    """train/good, test/good, test/crack with ground_truth/crack/*_mask.png holding 253."""
    rng = np.random.default_rng(0)
    for i in range(normals):
        _write(root / "train" / "good" / f"{i:03d}.png", _fastener(rng))
    for i in range(goods):
        _write(root / "test" / "good" / f"{i:03d}.png", _fastener(rng))
    for i in range(defects):
        image = _fastener(rng)
        image[4:14, 6:16] = 255  # a bright blob on the plate
        _write(root / "test" / "crack" / f"{i:03d}.png", image)
        mask = np.zeros((40, 40), dtype=np.uint8)
        mask[4:14, 6:16] = 253
        _write(root / "ground_truth" / "crack" / f"{i:03d}_mask.png", mask)
    return root


# --- loaders ---------------------------------------------------------------------------------


def test_mvtec_layout_loads_labels_types_and_masks_of_value_253(tmp_path):
    root = _make_mvtec(tmp_path / "clip")
    data = load_test_set(root, image_size=20, in_channels=1)
    assert detect_layout(root) == "mvtec"
    assert data.crops.shape == (6, 1, 20, 20) and data.crops.dtype == np.float32
    assert data.labels.tolist() == [1, 1, 1, 0, 0, 0]  # crack sorts before good
    assert data.defect_types == ["crack"] * 3 + ["good"] * 3
    assert data.paths[0] == root / "test" / "crack" / "000.png"
    # The 10 x 10 blob at (4, 6) of 40 px is a 5 x 5 block at (2, 3) of 20 px.
    expected = np.zeros((20, 20), dtype=np.uint8)
    expected[2:7, 3:8] = 1
    assert np.array_equal(data.masks[0], expected)
    assert not data.masks[3:].any()
    assert data.crops[0, 0, 4, 5] == pytest.approx(255.0)
    assert data.crops.min() >= 0.0 and data.crops.max() <= 255.0


def test_training_images_come_from_train_good_or_the_folder_itself(tmp_path):
    root = _make_mvtec(tmp_path / "clip", normals=4)
    train = load_normal_images(root, 16, 1)
    assert len(train) == 4 and train.layout == "normal" and not train.labels.any()
    assert train.root == root / "train" / "good"
    plain = load_normal_images(root / "train" / "good", 16, 1)
    assert np.array_equal(plain.crops, train.crops)
    with pytest.raises(InputUnreadableError, match="no normal training images"):
        load_normal_images(root / "ground_truth", 16, 1)


def test_folder_layout_with_and_without_masks(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(2):
        _write(tmp_path / "normal" / f"n{i}.png", _fastener(rng, 24))
        _write(tmp_path / "abnormal" / f"a{i}.png", _fastener(rng, 24))
    data = load_test_set(tmp_path, 24, 1)
    assert detect_layout(tmp_path) == "folders" and data.masks is None
    assert data.labels.tolist() == [0, 0, 1, 1]
    assert data.defect_types == ["good", "good", "abnormal", "abnormal"]
    mask = np.zeros((24, 24), dtype=np.uint8)
    mask[0:3, 0:4] = 254
    _write(tmp_path / "masks" / "a0.png", mask)
    _write(tmp_path / "masks" / "a1_mask.png", mask)
    data = load_test_set(tmp_path, 24, 1)
    assert data.masks[2].sum() == 12 and data.masks[3].sum() == 12 and data.masks[:2].sum() == 0
    (tmp_path / "masks" / "a1_mask.png").unlink()
    with pytest.raises(InputUnreadableError, match="no mask for .*a1.png"):
        load_test_set(tmp_path, 24, 1)


def test_unrecognised_or_empty_layouts_name_the_folder(tmp_path):
    (tmp_path / "pictures").mkdir()
    with pytest.raises(InputUnreadableError, match="pictures: layout not recognised"):
        load_test_set(tmp_path / "pictures", 16, 1)
    (tmp_path / "empty" / "test" / "good").mkdir(parents=True)
    with pytest.raises(InputUnreadableError, match=r"empty[/\\]test: no test images"):
        load_test_set(tmp_path / "empty", 16, 1)


def test_downscaling_averages_and_colour_converts(tmp_path):
    stripes = np.zeros((32, 32), dtype=np.uint8)
    stripes[:, 1::2] = 255  # one-pixel stripes: nearest would keep 0 or 255
    _write(tmp_path / "stripes.png", stripes)
    assert np.allclose(load_image(tmp_path / "stripes.png", 16, 1), 127.5, atol=0.5)
    bgr = np.zeros((8, 8, 3), dtype=np.uint8)
    bgr[:] = (10, 100, 200)  # blue, green, red
    _write(tmp_path / "colour.png", bgr)
    grey = load_image(tmp_path / "colour.png", 8, 1)
    assert grey[0, 0, 0] == pytest.approx(0.299 * 200 + 0.587 * 100 + 0.114 * 10, abs=0.5)
    rgb = load_image(tmp_path / "colour.png", 8, 3)
    assert rgb[:, 0, 0].tolist() == [200.0, 100.0, 10.0]
    deep = np.full((8, 8), 65535, dtype=np.uint16)
    _write(tmp_path / "deep.png", deep)
    assert load_image(tmp_path / "deep.png", 8, 1).max() == pytest.approx(255.0)


def test_stratified_folds_are_deterministic_disjoint_and_keep_proportions():
    labels = np.array([0] * 10 + [1] * 5)
    folds = stratified_folds(labels, n_folds=5, seed=3)
    assert len(folds) == 5
    held_out = np.concatenate([test for _, test in folds])
    assert sorted(held_out.tolist()) == list(range(15))
    for train, test in folds:
        assert not set(train) & set(test) and len(train) + len(test) == 15
        assert labels[test].tolist().count(1) == 1 and len(test) == 3
    again = stratified_folds(labels, n_folds=5, seed=3)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
    other = stratified_folds(labels, n_folds=5, seed=4)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(folds, other))


# --- z-score baseline ------------------------------------------------------------------------


def test_zscore_baseline_hand_example(tmp_path):
    train = np.array([[[[10, 50], [0, 100]]], [[[30, 50], [4, 120]]]], dtype=np.float32)
    baseline = ZScoreBaseline.fit(train, top_k=2, std_floor=1.0)
    assert baseline.mean[0].tolist() == [[20, 50], [2, 110]]
    assert baseline.std[0].tolist() == [[10, 1], [2, 10]]  # 0 floored to 1
    anomaly_map, score = baseline.score(np.array([[[[40, 53], [2, 110]]]], dtype=np.float32))
    assert anomaly_map.shape == (1, 1, 2, 2)
    assert anomaly_map[0, 0].tolist() == [[2, 3], [0, 0]]
    assert score.tolist() == [2.5]  # top-2 mean
    baseline.save(tmp_path / "baseline.npz")
    loaded = ZScoreBaseline.load(tmp_path / "baseline.npz")
    assert loaded.top_k == 2 and loaded.num_train_crops == 2
    assert np.array_equal(loaded.std, baseline.std)


def test_zscore_baseline_averages_channels():
    train = np.zeros((2, 3, 1, 2), dtype=np.float32)
    train[1] = 2.0  # every pixel: mean 1, std 1
    crop = np.ones((1, 3, 1, 2), dtype=np.float32)
    crop[0, 0, 0, 0] = 4.0  # z = 3 in one channel of one pixel
    anomaly_map, score = ZScoreBaseline.fit(train, top_k=1).score(crop)
    assert anomaly_map[0, 0].tolist() == [[1.0, 0.0]]
    assert score.tolist() == [1.0]


# --- heatmaps --------------------------------------------------------------------------------


def test_overlay_png_colours_the_map_and_outlines_the_defect():
    crop = np.full((1, 16, 16), 128.0, dtype=np.float32)
    anomaly_map = np.zeros((16, 16), dtype=np.float32)
    anomaly_map[:, 8:] = 1.0
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[4:12, 10:14] = 1
    png = overlay_png(crop, anomaly_map, mask)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (16, 16, 3)
    blue, _, red = image[8, 2].astype(int)  # map 0: JET blue
    assert blue > red + 50
    blue, _, red = image[1, 12].astype(int)  # map 1: JET red
    assert red > blue + 50
    assert image[4, 11].tolist() == [255, 255, 255]  # outline on the mask's top edge
    assert image[8, 11].tolist() != [255, 255, 255]  # not inside it


def test_write_panels_writes_one_three_tile_image_per_crop(tmp_path):
    crops = np.zeros((2, 1, 32, 32), dtype=np.float32)
    written = write_panels(
        tmp_path, crops, crops.copy(), np.zeros((2, 1, 32, 32)), None, ["a", "b.png"]
    )
    assert [path.name for path in written] == ["a.png", "b.png"]
    image = cv2.imread(str(written[0]))
    assert image.shape == (128, 384, 3)  # three tiles, each enlarged to 128 px


# --- edge eval -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from edge.model import DiffFastener, preset
    from edge.model.checkpoint import save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("engines") / "tiny.pt"
    model_id = save_checkpoint(path, DiffFastener(preset("tiny")).eval())
    return path, model_id


SUMMARY_KEYS = {
    "checkpoint",
    "model_id",
    "preset",
    "threshold_source",
    "data_dir",
    "layout",
    "num_images",
    "num_normal",
    "num_anomalous",
    "defect_types",
    "has_masks",
    "image_size",
    "in_channels",
    "model",
    "baseline",
    "seconds",
    "crops_per_second",
    "baseline_train_dir",
    "baseline_train_crops",
}
METRIC_KEYS = {
    "num_images",
    "num_anomalous",
    "image_auroc",
    "image_auroc_map_max",
    "pixel_auroc",
    "aupro",
    "aupro_fpr_limit",
    "f1_max",
    "f1_max_threshold",
    "threshold",
    "alarm_when",
    "precision",
    "recall",
    "per_defect_image_auroc",
}


@pytest.mark.slow
def test_edge_eval_end_to_end_json_csv_heatmaps_and_baseline(tmp_path, tiny_checkpoint):
    checkpoint, model_id = tiny_checkpoint
    data = _make_mvtec(tmp_path / "clip")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "edge", "eval", str(checkpoint), str(data), "--json"]
    command += ["--baseline", "--csv", str(tmp_path / "scores.csv")]
    command += ["--heatmaps", str(tmp_path / "heatmaps")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)  # stdout holds the JSON only; logs went to stderr
    assert set(summary) == SUMMARY_KEYS
    assert set(summary["model"]) == METRIC_KEYS == set(summary["baseline"])
    assert summary["model_id"] == model_id and summary["preset"] == "tiny"
    assert (summary["num_images"], summary["num_normal"], summary["num_anomalous"]) == (6, 3, 3)
    assert summary["layout"] == "mvtec" and summary["has_masks"] is True
    assert summary["defect_types"] == ["crack"] and summary["threshold_source"] == "f1_max"
    assert summary["baseline_train_crops"] == 3
    assert summary["baseline_train_dir"] == str(data / "train" / "good")
    model = summary["model"]
    assert 0.0 <= model["image_auroc"] <= 1.0 and 0.0 <= model["aupro"] <= 1.0
    assert model["threshold"] == model["f1_max_threshold"]
    assert set(model["per_defect_image_auroc"]) == {"crack"}
    # A blob of 255 on a plate of 60 that never varies in training: the z-score baseline
    # separates the sets perfectly, and its map finds the blob's pixels.
    assert summary["baseline"]["image_auroc"] == 1.0
    assert summary["baseline"]["pixel_auroc"] > 0.95
    assert '"event": "eval_done"' in done.stderr
    with (tmp_path / "scores.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 6
    assert set(rows[0]) == {"path", "defect_type", "label", "image_score", "anomalous"} | {
        "baseline_score"
    }
    assert [row["label"] for row in rows] == ["1", "1", "1", "0", "0", "0"]
    assert len(list((tmp_path / "heatmaps").glob("*.png"))) == 6


def test_evaluate_api_on_a_folder_layout_with_a_fixed_threshold(tmp_path, tiny_checkpoint):
    from edge.model.checkpoint import load_checkpoint

    model, _ = load_checkpoint(tiny_checkpoint[0])
    rng = np.random.default_rng(2)
    for i in range(3):
        _write(tmp_path / "normal" / f"n{i}.png", _fastener(rng, 32))
        _write(tmp_path / "abnormal" / f"a{i}.png", _fastener(rng, 32))
    dataset = load_test_set(tmp_path, model.config.image_size, model.config.in_channels)
    model.train()
    result = evaluate(model, dataset, threshold=-1.0, batch_size=4)
    assert model.training  # mode restored for the training loop that called it
    assert result.model.anomaly_maps.shape == (6, 32, 32)
    assert result.model.metrics.threshold == -1.0
    # Every score is >= -1: all six called anomalous, so precision 3/6 and recall 1.
    assert result.model.metrics.precision == pytest.approx(0.5)
    assert result.model.metrics.recall == 1.0
    assert result.model.metrics.pixel_auroc is None and result.baseline is None
    with torch.inference_mode():
        _, direct, _ = model.eval()(torch.from_numpy(dataset.crops[:1]))
    assert result.model.image_scores[0] == pytest.approx(float(direct[0]), abs=1e-6)


def test_edge_eval_exit_status_names_an_unrecognised_folder(tmp_path, tiny_checkpoint, capsys):
    from edge.cli import main

    (tmp_path / "photos").mkdir()
    status = main(["eval", str(tiny_checkpoint[0]), str(tmp_path / "photos"), "--json"])
    assert status == ExitStatus.INPUT_UNREADABLE
    captured = capsys.readouterr()
    assert captured.out == "" and "photos: layout not recognised" in captured.err


def test_edge_eval_takes_the_threshold_from_a_calibration_file(tmp_path, tiny_checkpoint, capsys):
    from edge.cli import main

    checkpoint, model_id = tiny_checkpoint
    calibration = tmp_path / "camera-1.json"
    calibration.write_text(json.dumps({"threshold": 2.0, "model_id": model_id}))
    assert read_calibration_threshold(calibration) == (2.0, model_id)
    data = _make_mvtec(tmp_path / "clip", normals=0, goods=2, defects=2)
    status = main(["eval", str(checkpoint), str(data), "--json", "--calibration", str(calibration)])
    assert status == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["threshold_source"] == "calibration" and summary["baseline"] is None
    # Map values lie in [0, 1], so a threshold of 2 calls nothing anomalous: recall 0.
    assert summary["model"]["threshold"] == 2.0 and summary["model"]["recall"] == 0.0
    assert summary["model"]["precision"] is None
    calibration.write_text('{"thresh": 0.5}')
    with pytest.raises(ConfigInvalidError, match="camera-1.json: no numeric 'threshold'"):
        read_calibration_threshold(calibration)


def _last_error_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.timeout(60)
def test_edge_eval_checks_its_output_paths_before_scoring(
    tmp_path, tiny_checkpoint, capsys, monkeypatch
):
    from edge.cli import main
    from edge.evaluate import run

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored before the output paths were checked")

    monkeypatch.setattr(run, "evaluate", no_scoring)
    argv = ["eval", str(tiny_checkpoint[0]), str(_make_mvtec(tmp_path / "clip"))]
    assert main([*argv, "--csv", str(tmp_path)]) == ExitStatus.CONFIG_INVALID
    assert _last_error_line(capsys) == (
        f"edge eval: {tmp_path}: a folder, not a file (--csv names the file to write)"
    )
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"")
    assert main([*argv, "--heatmaps", str(taken)]) == ExitStatus.CONFIG_INVALID
    assert _last_error_line(capsys) == (
        f"edge eval: {taken}: a file, not a folder (--heatmaps names the folder to write into)"
    )


@pytest.mark.timeout(60)
def test_edge_eval_refuses_a_calibration_fitted_for_another_model(
    tmp_path, tiny_checkpoint, capsys
):
    from edge.cli import main

    checkpoint, model_id = tiny_checkpoint
    calibration = tmp_path / "cam0.thresholds.json"
    calibration.write_text(json.dumps({"threshold": 0.5, "model_id": "0123456789ab"}))
    data = _make_mvtec(tmp_path / "clip", normals=0, goods=2, defects=2)
    argv = ["eval", str(checkpoint), str(data), "--calibration", str(calibration)]
    assert main(argv) == ExitStatus.CONFIG_INVALID
    captured = capsys.readouterr()
    # The words of edge-replay's refusal (edge.publisher.thresholds.load_thresholds).
    assert captured.out == "" and captured.err.strip().splitlines()[-1] == (
        f"edge eval: {calibration}: fitted for model 0123456789ab, not for the model in use "
        f"({model_id}); run edge calibrate for this model"
    )
    assert main([*argv[:-1], str(tmp_path)]) == ExitStatus.CONFIG_INVALID
    assert _last_error_line(capsys) == (
        f"edge eval: {tmp_path}: a folder, not a calibration file (.json)"
    )


@pytest.mark.timeout(60)
def test_edge_eval_names_what_was_given_instead_of_a_checkpoint_or_a_folder(
    tmp_path, tiny_checkpoint, capsys
):
    from edge.cli import main

    data = str(_make_mvtec(tmp_path / "clip", normals=0, goods=1, defects=1))
    graph = REPO / "engines" / "track-edge.onnx"
    assert main(["eval", str(graph), data]) == ExitStatus.MODEL_INVALID
    error = capsys.readouterr().err
    assert "weights_only" not in error
    assert error.strip().splitlines()[-1] == (
        f"edge eval: {graph}: an ONNX graph, not a checkpoint; this command needs the .pt "
        "checkpoint written by edge train (e.g. runs/NAME/best.pt)"
    )
    assert main(["eval", str(tmp_path), data]) == ExitStatus.MODEL_INVALID
    assert _last_error_line(capsys) == (
        f"edge eval: {tmp_path}: a folder, not a checkpoint file (.pt)"
    )
    checkpoint = str(tiny_checkpoint[0])
    assert main(["eval", checkpoint, checkpoint]) == ExitStatus.INPUT_UNREADABLE
    assert _last_error_line(capsys) == f"edge eval: {checkpoint}: a file, not a folder"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bad", ["nan", "inf", "-Infinity"])
def test_edge_eval_refuses_a_threshold_that_is_not_finite(tmp_path, capsys, bad):
    from edge.cli import main

    with pytest.raises(SystemExit) as caught:
        main(["eval", "model.pt", str(tmp_path), f"--threshold={bad}"])
    assert caught.value.code == ExitStatus.USAGE
    assert _last_error_line(capsys) == (
        f"edge eval: error: argument --threshold: {bad!r} is not a finite number"
    )
