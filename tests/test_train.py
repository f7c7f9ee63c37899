"""Training: resume, checkpoints, DDP, and that the tiny preset learns to find defects."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fastener_images import write_normal_folder

from edge.errors import ExitStatus, ModelInvalidError
from edge.model import preset
from edge.model.checkpoint import (
    load_checkpoint,
    model_id,
    read_checkpoint,
    save_checkpoint,
    weights_id,
)
from edge.model.config import ModelConfig
from edge.model.detector import DiffFastener
from edge.train import TrainConfig, learning_rate_factor, train

REPO = Path(__file__).resolve().parents[1]


def tiny_config(data: Path, out: Path, steps: int, **overrides) -> TrainConfig:
    return TrainConfig(
        data_dir=str(data),
        out_dir=str(out),
        model=preset("tiny"),
        steps=steps,
        batch_size=4,
        warmup_steps=2,
        val_every=steps,
        checkpoint_every=3,
        num_threads=1,
        **overrides,
    )


@pytest.fixture(scope="module")
def normal_folder(tmp_path_factory):
    return write_normal_folder(tmp_path_factory.mktemp("crops"), 24, seed=0)


def test_learning_rate_warms_up_then_decays():
    config = TrainConfig(data_dir=".", steps=110, warmup_steps=10)
    assert learning_rate_factor(0, config) == pytest.approx(0.1)
    assert learning_rate_factor(9, config) == pytest.approx(1.0)
    assert learning_rate_factor(60, config) == pytest.approx(0.05 + 0.95 * 0.5)
    assert learning_rate_factor(110, config) == pytest.approx(0.05)


@pytest.mark.parametrize(
    "options", [{}, {"ema_decay": 0.9, "denoiser_only_steps": 2}], ids=["plain", "ema"]
)
def test_resumed_run_ends_with_the_weights_of_an_unbroken_one(normal_folder, tmp_path, options):
    unbroken = train(tiny_config(normal_folder, tmp_path / "a", 6, **options))
    train(tiny_config(normal_folder, tmp_path / "b", 3, **options))
    resumed = train(
        tiny_config(normal_folder, tmp_path / "b", 6, **options), resume=tmp_path / "b" / "last.pt"
    )
    first = read_checkpoint(tmp_path / "a" / "last.pt")
    second = read_checkpoint(tmp_path / "b" / "last.pt")
    assert first["step"] == second["step"] == 6
    assert first["model_id"] == second["model_id"]
    assert unbroken.name == resumed.name == "best.pt"
    if options:
        # The shipped weights are the average, the resumable ones the raw weights.
        assert weights_id(first["raw_model"]) != weights_id(first["model"])
        assert weights_id(first["raw_model"]) == weights_id(second["raw_model"])


def test_the_model_id_changes_with_the_inference_settings_not_only_the_weights(tmp_path):
    model = DiffFastener(preset("tiny"))
    other = DiffFastener(preset("tiny", diffusion={"t_small": 150}))
    other.load_state_dict(model.state_dict())
    first = save_checkpoint(tmp_path / "a.pt", model)
    second = save_checkpoint(tmp_path / "b.pt", other)
    assert first != second
    assert weights_id(model.state_dict()) == weights_id(other.state_dict())
    # A config edited inside the file no longer matches its recorded id.
    payload = torch.load(tmp_path / "b.pt", weights_only=True)
    payload["config"] = payload["config"].replace('"t_small": 150', '"t_small": 200')
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(ModelInvalidError, match="not to the recorded model id"):
        load_checkpoint(tmp_path / "edited.pt")


def test_checkpoint_loads_with_weights_only_and_records_the_run(normal_folder, tmp_path):
    train(tiny_config(normal_folder, tmp_path, 3))
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    model, _ = load_checkpoint(tmp_path / "last.pt")
    assert payload["model_id"] == model_id(model.state_dict(), model.config)
    assert payload["extra"]["train"]["steps"] == 3
    assert "optimizer" in payload
    assert "optimizer" not in torch.load(tmp_path / "best.pt", weights_only=True)


def test_a_damaged_checkpoint_is_refused_with_its_name(tmp_path):
    from edge.errors import ModelInvalidError

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelInvalidError, match="bad.pt"):
        load_checkpoint(bad)


@pytest.mark.slow
def test_torchrun_ddp_on_two_cpu_processes_keeps_replicas_identical(normal_folder, tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "edge",
        "train",
        str(normal_folder),
        "--preset",
        "tiny",
        "--out",
        str(tmp_path),
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--threads",
        "1",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    replicas = [event for event in events if event.get("event") == "replica_weights"]
    assert sorted(event["rank"] for event in replicas) == [0, 1]
    assert all(event["identical"] for event in replicas)
    assert len({event["model_id"] for event in replicas}) == 1
    assert read_checkpoint(tmp_path / "last.pt")["model_id"] == replicas[0]["model_id"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tiny_preset_learns_to_find_defects_it_never_saw(tmp_path):
    """Trained on normal crops and DiffusionAD's synthesis (Perlin regions filled with the
    crop's own shuffled texture or with noise), the tiny model must rank held-out crops whose
    clip is missing, moved off its seat or half gone, kinds it never saw, above normal ones.

    The recipe is the shipped model's at a smaller scale: the denoiser first learns normal
    crops alone, then segmentation joins in (edge/train.py).
    """
    from fastener_images import write_mvtec_test

    from edge.evaluate.datasets import load_test_set
    from edge.evaluate.run import evaluate
    from edge.synthesis import SynthesisConfig

    root = tmp_path / "crops"
    write_normal_folder(root / "train" / "good", 96, seed=0)
    write_mvtec_test(root, 24, seed=100, kinds=("missing", "displaced", "broken"))
    config = TrainConfig(
        data_dir=str(root),
        out_dir=str(tmp_path / "run"),
        model=preset(
            "tiny",
            diffusion={
                "train_t_small": (150, 350),
                "train_t_large": (350, 550),
                "t_small": 250,
                "t_large": 450,
            },
        ),
        synthesis=SynthesisConfig(
            perlin_scale_exponents=(0, 2),
            threshold=0.3,
            opacity=(0.0, 0.4),
            texture_weights={"self": 0.5, "noise": 0.5},
            min_area_fraction=0.05,
        ),
        steps=500,
        denoiser_only_steps=300,
        lr_denoiser=1e-3,
        lr_segmenter=1e-3,
        warmup_steps=20,
        focal_gamma=2.0,
        foreground="centre",
        ema_decay=0.99,
        val_every=500,
        checkpoint_every=500,
        num_threads=2,
    )
    train(config)
    model, _ = load_checkpoint(tmp_path / "run" / "last.pt")
    metrics = evaluate(model, load_test_set(root, 32, 1)).model.metrics
    assert metrics.image_auroc >= 0.9, metrics.to_dict()
    for kind, auroc in metrics.per_defect_image_auroc.items():
        assert auroc >= 0.8, (kind, metrics.to_dict())


# --- what edge train says about bad options and files ------------------------------------------


def _last_error_line(capsys) -> str:
    """The last line on stderr (the logs before it are JSON lines)."""
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--steps", "0", "argument --steps: 0 is not a whole number of at least 1"),
        ("--steps", "-3", "argument --steps: -3 is not a whole number of at least 1"),
        ("--batch-size", "0", "argument --batch-size: 0 is not an even whole number of at least 2"),
        ("--batch-size", "3", "argument --batch-size: 3 is not an even whole number of at least 2"),
        ("--threads", "0", "argument --threads: 0 is not a whole number of at least 1"),
    ],
)
def test_edge_train_refuses_a_bad_number_as_usage(tmp_path, capsys, flag, value, message):
    from edge.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["train", str(tmp_path), flag, value])
    assert stopped.value.code == ExitStatus.USAGE
    assert _last_error_line(capsys).startswith(f"edge train: error: {message}")


@pytest.mark.timeout(30)
def test_edge_train_names_a_bad_config_file_and_an_out_that_is_a_file(tmp_path, capsys):
    from edge.cli import main

    data = str(tmp_path)
    config = tmp_path / "run.json"
    config.write_text('{"stpes": 3}')
    assert main(["train", data, "--config", str(config)]) == ExitStatus.CONFIG_INVALID
    assert (
        _last_error_line(capsys) == f"edge train: {config}: stpes: Extra inputs are not permitted"
    )
    missing = tmp_path / "missing.json"
    assert main(["train", data, "--config", str(missing)]) == ExitStatus.CONFIG_INVALID
    assert _last_error_line(capsys) == (
        f"edge train: {missing}: cannot read (No such file or directory)"
    )
    taken = tmp_path / "taken"
    taken.write_text("")
    assert main(["train", data, "--out", str(taken)]) == ExitStatus.CONFIG_INVALID
    assert _last_error_line(capsys) == (
        f"edge train: {taken}: a file, not a folder (--out names the folder to write into)"
    )
    status = main(["train", data, "--out", str(tmp_path / "run"), "--resume", str(tmp_path)])
    assert status == ExitStatus.MODEL_INVALID
    assert (
        _last_error_line(capsys) == f"edge train: {tmp_path}: a folder, not a checkpoint file (.pt)"
    )
    assert not (tmp_path / "run").exists()


def test_config_file_keeps_its_values_under_the_flags_given(tmp_path):
    from edge.train import build_config

    config = tmp_path / "run.json"
    config.write_text('{"steps": 3, "batch_size": 6, "model": {"preset": "mine", "top_k": 10}}')
    built = build_config(str(config), data_dir="crops", steps=5)
    assert (built.data_dir, built.steps, built.batch_size) == ("crops", 5, 6)
    # As the file alone reads: the model's keys over ModelConfig's defaults.
    assert built.model == ModelConfig(preset="mine", top_k=10)


def test_an_onnx_graph_or_a_folder_is_not_taken_for_a_checkpoint(tmp_path):
    graph = tmp_path / "track-edge.onnx"
    graph.write_bytes(b"\x08\x08\x12\x07pytorch")  # how an ONNX protobuf starts
    with pytest.raises(ModelInvalidError) as refused:
        read_checkpoint(graph)
    assert str(refused.value) == (
        f"{graph}: an ONNX graph, not a checkpoint; this command needs the .pt checkpoint "
        "written by edge train (e.g. runs/NAME/best.pt)"
    )
    with pytest.raises(ModelInvalidError, match="a folder, not a checkpoint file"):
        read_checkpoint(tmp_path)
    renamed = tmp_path / "model.pt"
    renamed.write_bytes(graph.read_bytes())
    with pytest.raises(ModelInvalidError) as refused:
        read_checkpoint(renamed)
    assert "weights_only" not in str(refused.value)
    assert str(refused.value) == (
        f"{renamed}: not a checkpoint written by edge train (damaged, or another kind of file)"
    )
