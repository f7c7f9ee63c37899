"""k-fold cross-validation: folds train on normal crops only and cover every crop once."""

import json

import numpy as np
import pytest
from fastener_images import write_mvtec_test, write_normal_folder

from edge.errors import ExitStatus
from edge.evaluate.crossval import all_crops, cross_validate
from edge.model import preset
from edge.train import TrainConfig


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_fold_cross_validation(tmp_path):
    root = tmp_path / "crops"
    write_normal_folder(root / "train" / "good", 12, seed=0)
    write_mvtec_test(root, 4, seed=1, kinds=("missing",))
    crops = all_crops(root, 32, 1)
    assert len(crops) == 12 + 4 + 4 and int(crops.labels.sum()) == 4
    config = TrainConfig(
        data_dir=str(root),
        model=preset("tiny"),
        steps=2,
        batch_size=2,
        warmup_steps=1,
        val_fraction=0.0,
        num_threads=1,
    )
    result = cross_validate(config, 2, tmp_path / "runs")
    assert [fold["fold"] for fold in result["folds"]] == [0, 1]
    # Each fold holds out half of the 16 normal crops and trains on the other half.
    assert [fold["train_crops"] for fold in result["folds"]] == [8, 8]
    assert sum(fold["num_images"] for fold in result["folds"]) == 20
    aurocs = [fold["image_auroc"] for fold in result["folds"]]
    assert result["summary"]["image_auroc"]["mean"] == pytest.approx(np.mean(aurocs))
    assert result["summary"]["image_auroc"]["std"] == pytest.approx(np.std(aurocs))
    assert (tmp_path / "runs" / "fold1" / "last.pt").is_file()
    json.dumps(result)


def _last_error_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.timeout(30)
def test_edge_crossval_refuses_too_few_or_too_many_folds_as_usage(tmp_path, capsys):
    from edge.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["crossval", str(tmp_path), "--folds", "1"])
    assert stopped.value.code == ExitStatus.USAGE
    assert _last_error_line(capsys).startswith(
        "edge crossval: error: argument --folds: 1 is too few folds; the smallest allowed is 2"
    )
    root = tmp_path / "crops"
    write_normal_folder(root / "train" / "good", 3, seed=0)
    write_mvtec_test(root, 2, seed=1, kinds=("missing",))  # 5 normal and 2 anomalous crops
    out = tmp_path / "runs"
    argv = ["crossval", str(root), "--preset", "tiny", "--folds", "6", "--out", str(out)]
    assert main(argv) == ExitStatus.USAGE
    assert _last_error_line(capsys) == (
        f"edge crossval: --folds 6: too many for {root} (5 normal and 2 anomalous crops); at most 5"
    )
    assert not out.exists()


@pytest.mark.timeout(30)
def test_edge_crossval_names_a_bad_config_file_and_an_out_that_is_a_file(tmp_path, capsys):
    from edge.cli import main

    config = tmp_path / "fold.json"
    config.write_text('{"batch_sise": 4}')
    assert main(["crossval", str(tmp_path), "--config", str(config)]) == ExitStatus.CONFIG_INVALID
    assert _last_error_line(capsys) == (
        f"edge crossval: {config}: batch_sise: Extra inputs are not permitted"
    )
    taken = tmp_path / "taken"
    taken.write_text("")
    assert main(["crossval", str(tmp_path), "--out", str(taken)]) == ExitStatus.CONFIG_INVALID
    assert _last_error_line(capsys) == (
        f"edge crossval: {taken}: a file, not a folder (--out names the folder to write into)"
    )
