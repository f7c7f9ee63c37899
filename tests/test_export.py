"""The exported graph: what is in it, its metadata, and that TensorRT can parse every op."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from engine_helpers import artifacts
from onnx import numpy_helper

from edge.cli import main as edge_main
from edge.engine.metadata import metadata_path, read_metadata, sha256_file
from edge.errors import ExitStatus, ModelInvalidError
from edge.model import DiffFastener, preset

pytestmark = pytest.mark.timeout(240)

# ONNX operators TensorRT's ONNX parser supports, from the operator support matrix of
# onnx/onnx-tensorrt, docs/operators.md at commit 6d0ab7be324d02c7feb3a306b6fdbeae84f71ddc
# ("TensorRT 8.5 supports operators up to Opset 17"): the rows marked Y. TensorRT 8.5 is the
# oldest release we target (JetPack 5.1); later releases (8.6, 10.x) support a superset.
TENSORRT_8_5_OPSET = 17
TENSORRT_8_5_OPS = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
    Cast Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
    DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten
    Floor Gather GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
    Greater GreaterOrEqual GridSample GRU HardSwish HardSigmoid Identity If ImageScaler
    InstanceNormalization IsNaN LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM
    LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mod Mul Neg
    NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear
    RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1
    ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
    ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan
    Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax
    Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
    Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()  # noqa: SIM905 - the table's names, as a block
)
# Restrictions in the same table, for the ops this graph uses.
RESIZE_COORDINATE_MODES = {
    "half_pixel",
    "pytorch_half_pixel",
    "tf_half_pixel_for_nn",
    "asymmetric",
    "align_corners",
}
RESIZE_MODES = {"nearest", "linear"}
RESIZE_NEAREST_MODES = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}
# Cast: FP32, FP16, INT32, INT8, BOOL, and INT64 which the parser casts down to INT32.
CAST_TARGETS = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.INT32,
    onnx.TensorProto.INT8,
    onnx.TensorProto.BOOL,
    onnx.TensorProto.INT64,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return artifacts(tmp_path_factory, "tiny")


@pytest.fixture(scope="module")
def edge_preset(tmp_path_factory):
    return artifacts(tmp_path_factory, "edge")


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node outputs, by tensor name."""
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(_attributes(node)["value"])
    return values


def test_export_writes_graph_and_metadata(tiny):
    graph = onnx.load(str(tiny.onnx))
    onnx.checker.check_model(graph, full_check=True)
    metadata = read_metadata(tiny.onnx)
    config = preset("tiny")

    assert metadata.model_id == tiny.model_id
    assert metadata.preset == "tiny"
    assert metadata.model == json.loads(config.to_json())
    assert (metadata.image_size, metadata.in_channels) == (32, 1)
    assert metadata.onnx_sha256 == sha256_file(tiny.onnx)
    assert metadata.opset == 17
    assert [op.version for op in graph.opset_import if op.domain in ("", "ai.onnx")] == [17]
    assert metadata.input.name == "crops" and metadata.input.dtype == "float32"
    assert metadata.input.shape == ["batch", 1, 32, 32]
    assert [(o.name, o.dtype) for o in metadata.outputs] == [
        ("anomaly_map", "float32"),
        ("image_score", "float32"),
        ("reconstruction", "float32"),
    ]
    assert metadata.thresholds.pattern == "calibration/{vehicle}/{camera}.thresholds.json"
    assert metadata.thresholds.keyed_by == "model_id"
    assert metadata.export_check["image_score_max_abs"] < 1e-5

    # The graph itself: one input with a dynamic batch axis, the three named outputs.
    assert [i.name for i in graph.graph.input] == ["crops"]
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch"
    assert [o.name for o in graph.graph.output] == [
        "anomaly_map",
        "image_score",
        "reconstruction",
    ]
    assert {p.key: p.value for p in graph.metadata_props}["model_id"] == tiny.model_id


def test_graph_holds_the_fixed_noise_and_a_float_timestep(tiny):
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(tiny.onnx))).graph
    model = DiffFastener(preset("tiny"))
    constants = _constants(graph)
    for buffer in (model.noise_small, model.noise_large):
        assert any(
            value.shape == tuple(buffer.shape) and np.array_equal(value, buffer.numpy())
            for value in constants.values()
        ), "the fixed inference noise is not a constant of the graph"

    # The sinusoidal embedding (Cos, Sin) takes a float timestep.
    types = {vi.name: vi.type.tensor_type.elem_type for vi in graph.value_info}
    trig = [node for node in graph.node if node.op_type in ("Cos", "Sin")]
    assert len(trig) == 2
    for node in trig:
        assert types[node.input[0]] == onnx.TensorProto.FLOAT


@pytest.mark.parametrize("preset_name", ["tiny", pytest.param("edge", marks=pytest.mark.slow)])
def test_every_op_is_supported_by_tensorrt(preset_name, tmp_path_factory):
    path = artifacts(tmp_path_factory, preset_name).onnx
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    opsets = {op.domain: op.version for op in model.opset_import}
    assert set(opsets) <= {"", "ai.onnx"}, f"custom op domains: {opsets}"
    assert 17 <= opsets.get("", opsets.get("ai.onnx")) <= TENSORRT_8_5_OPSET

    graph = model.graph
    ops = {node.op_type for node in graph.node}
    assert ops - TENSORRT_8_5_OPS == set(), "ops TensorRT 8.5 cannot parse"
    # Sanity: this is the real detector, not an empty graph.
    assert {"Conv", "InstanceNormalization", "Softmax", "TopK", "Resize"} <= ops

    constants = _constants(graph)
    dilated = []
    for node in graph.node:
        attributes = _attributes(node)
        if node.op_type == "Conv":
            assert node.input[1] in constants, "Conv weights must be constant"
            # 1-D: the attention's qkv/proj (nn.Conv1d). The 8.5 table lists Conv without the
            # "2D or 3D convolutions only" restriction its 8.4 table had; the parser unsqueezes.
            assert len(attributes["kernel_shape"]) in (1, 2)
            assert attributes.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
            if any(d != 1 for d in attributes.get("dilations", [1])):
                dilated.append(attributes)
        elif node.op_type == "TopK":
            assert node.input[1] in constants, "TopK's K must be an initializer"
        elif node.op_type == "InstanceNormalization":
            assert node.input[1] in constants and node.input[2] in constants
        elif node.op_type in ("Slice",) and len(node.input) > 3:
            assert node.input[3] in constants, "Slice axes must be an initializer"
        elif node.op_type in ("Unsqueeze", "Squeeze") and len(node.input) > 1:
            assert node.input[1] in constants, f"{node.op_type} axes must be constant"
        elif node.op_type == "Resize":
            assert attributes.get("mode", b"nearest").decode() in RESIZE_MODES
            mode = attributes.get("coordinate_transformation_mode", b"half_pixel").decode()
            assert mode in RESIZE_COORDINATE_MODES
            nearest = attributes.get("nearest_mode", b"round_prefer_floor").decode()
            assert nearest in RESIZE_NEAREST_MODES
        elif node.op_type == "Cast":
            assert attributes["to"] in CAST_TARGETS
        elif node.op_type in ("AveragePool", "MaxPool"):
            assert len(attributes["kernel_shape"]) == 2

    # DACM's 3x3 convolution, dilation 2, with explicit padding 2 (microsoft/onnxscript#3037).
    assert len(dilated) == 1
    assert list(dilated[0]["dilations"]) == [2, 2]
    assert list(dilated[0]["pads"]) == [2, 2, 2, 2]


def test_export_command_prints_summary_and_rejects_bad_checkpoint(tiny, tmp_path, capsys):
    out = tmp_path / "engines" / "tiny.onnx"
    assert edge_main(["export", str(tiny.checkpoint), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["model_id"] == tiny.model_id
    assert summary["onnx_sha256"] == sha256_file(out)
    assert metadata_path(out).is_file()

    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    status = edge_main(["export", str(broken), "--out", str(tmp_path / "x.onnx")])
    assert status == ExitStatus.MODEL_INVALID
    assert "broken.pt" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_metadata_detects_a_replaced_graph(tiny, tmp_path):
    copy = tmp_path / "tiny.onnx"
    data = bytearray(tiny.onnx.read_bytes())
    data[-1] ^= 0xFF
    copy.write_bytes(bytes(data))
    metadata_path(copy).write_text(metadata_path(tiny.onnx).read_text())
    with pytest.raises(ModelInvalidError, match="SHA-256"):
        read_metadata(copy)
    metadata_path(copy).unlink()
    with pytest.raises(ModelInvalidError, match="no metadata"):
        read_metadata(copy)


def _last_error_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_export_refuses_an_out_it_cannot_write_and_leaves_nothing(tiny, tmp_path, capsys):
    folder = tmp_path / "engines"
    folder.mkdir()
    status = edge_main(["export", str(tiny.checkpoint), "--out", str(folder)])
    assert status == ExitStatus.CONFIG_INVALID
    assert _last_error_line(capsys) == (
        f"edge export: {folder}: a folder, not a file (--out names the file to write)"
    )
    assert sorted(tmp_path.iterdir()) == [folder] and list(folder.iterdir()) == []
    if Path("/proc").is_dir():
        status = edge_main(["export", str(tiny.checkpoint), "--out", "/proc/nope/x.onnx"])
        assert status == ExitStatus.CONFIG_INVALID
        assert _last_error_line(capsys).startswith(
            "edge export: /proc/nope/x.onnx: cannot be written (no file can be made in /proc: "
        )


def test_export_names_a_graph_or_a_folder_given_as_the_checkpoint(tiny, tmp_path, capsys):
    out = str(tmp_path / "x.onnx")
    assert edge_main(["export", str(tiny.onnx), "--out", out]) == ExitStatus.MODEL_INVALID
    error = capsys.readouterr().err
    assert "weights_only" not in error
    assert error.strip().splitlines()[-1] == (
        f"edge export: {tiny.onnx}: an ONNX graph, not a checkpoint; this command needs the "
        ".pt checkpoint written by edge train (e.g. runs/NAME/best.pt)"
    )
    assert edge_main(["export", str(tmp_path), "--out", out]) == ExitStatus.MODEL_INVALID
    assert _last_error_line(capsys) == (
        f"edge export: {tmp_path}: a folder, not a checkpoint file (.pt)"
    )
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_the_checkpoint_or_a_path_not_ending_in_onnx_as_out(
    tiny, tmp_path, capsys, monkeypatch
):
    from edge.engine import export

    def no_loading(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before --out was checked")

    monkeypatch.setattr(export, "load_checkpoint", no_loading)
    checkpoint = tmp_path / "engines" / "track-edge.pt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(tiny.checkpoint.read_bytes())
    before = checkpoint.read_bytes()
    same = tmp_path / "engines" / ".." / "engines" / "track-edge.pt"  # another spelling
    assert edge_main(["export", str(checkpoint), "--out", str(same)]) == ExitStatus.USAGE
    assert _last_error_line(capsys) == (
        f"edge export: --out {same}: the checkpoint being exported; the graph would overwrite "
        "it (give engines/NAME.onnx)"
    )
    text = tmp_path / "y.txt"
    assert edge_main(["export", str(checkpoint), "--out", str(text)]) == ExitStatus.USAGE
    assert _last_error_line(capsys) == (
        f"edge export: --out {text}: not a .onnx file; the graph is written as NAME.onnx"
    )
    assert checkpoint.read_bytes() == before
    assert sorted(tmp_path.rglob("*")) == [checkpoint.parent, checkpoint]
