"""k-fold cross-validation: folds train on normal crops only and cover every crop once."""

import json

import numpy as np
import pytest
from fastener_images import write_mvtec_test, write_normal_folder

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
