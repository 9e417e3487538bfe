"""normfold.export_onnx: dynamo export, dynamic batch, opset from the norm layers, external data, errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import normfold as nf
from normfold.check.runtime import create_session
from normfold.errors import ExportError, InputError, UsageError
from normfold.export import OPSET_FLOOR, OPSET_GROUPNORM, OPSET_RMSNORM, batch_dims, choose_opset
from normfold.tolerances import check_tolerance


class NormNet(nn.Module):
    """Conv then one normalization layer of the given kind (channels-last for LayerNorm/RMSNorm)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = {"bn": nn.BatchNorm2d(8), "ln": nn.LayerNorm(8), "gn": nn.GroupNorm(2, 8),
                     "rms": nn.RMSNorm(8), "none": nn.Identity()}[kind]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.kind in ("ln", "rms"):
            return self.norm(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.norm(y)


def _net(kind: str) -> NormNet:
    torch.manual_seed(0)
    m = NormNet(kind)
    with torch.no_grad():
        for p in m.norm.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 1)
    return m.eval()


def _x(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def _assert_runs_like(model: nn.Module, proto_or_path, batch: int) -> None:
    rt = create_session(proto_or_path, ("cpu",), threads=1)
    x = _x(batch, seed=batch)
    got = rt.run([x])[0]
    with torch.no_grad():
        want = model(x)
    assert check_tolerance(torch.float32).allclose(got, want), (got - want).abs().max()


@pytest.mark.parametrize("kind, opset, op", [
    ("ln", OPSET_FLOOR, "LayerNormalization"),
    ("gn", OPSET_GROUPNORM, "GroupNormalization"),
    ("rms", OPSET_RMSNORM, "RMSNormalization"),
])
def test_norm_layers_export_as_native_ops_onnxruntime_runs(kind: str, opset: int, op: str) -> None:
    model = _net(kind)
    assert choose_opset(model)[0] == opset
    res = nf.export_onnx(model, (_x(),))
    proto = res.model_proto
    assert res.opset == opset
    ops = {n.op_type for n in proto.graph.node}
    assert op in ops, f"{kind} exported as {sorted(ops)} at opset {opset}, not as {op}"
    assert res.batch_dims == ["batch"] and batch_dims(proto) == ["batch"]
    for batch in (1, 5):  # any batch size runs, and matches PyTorch
        _assert_runs_like(model, proto, batch)


def test_below_their_opsets_groupnorm_and_rmsnorm_are_decomposed() -> None:
    """Why the opset is chosen: at the floor, GroupNorm and RMSNorm become elementwise ops."""
    for kind, op in (("gn", "GroupNormalization"), ("rms", "RMSNormalization")):
        res = nf.export_onnx(_net(kind), (_x(),), opset=OPSET_FLOOR)
        assert res.opset == OPSET_FLOOR and "requested" in res.opset_reason
        assert op not in {n.op_type for n in res.model_proto.graph.node}


def test_plain_and_batchnorm_models_use_the_floor_and_bn_is_fused() -> None:
    assert choose_opset(_net("none"))[0] == OPSET_FLOOR
    model = _net("bn")
    res = nf.export_onnx(model, _x())  # a bare tensor is one positional input
    assert res.opset == OPSET_FLOOR
    # onnxscript's optimizer fuses an inference BatchNormalization into the Conv before it
    assert "BatchNormalization" not in {n.op_type for n in res.model_proto.graph.node}
    _assert_runs_like(model, res.model_proto, 3)


def test_batch_of_one_is_tiled_so_the_batch_stays_symbolic() -> None:
    model = _net("none")
    res = nf.export_onnx(model, (_x(batch=1),))
    assert res.dynamic_batch and res.batch_dims == ["batch"]
    _assert_runs_like(model, res.model_proto, 4)


def test_static_batch_on_request() -> None:
    res = nf.export_onnx(_net("none"), (_x(batch=3),), dynamic_batch=False)
    assert res.batch_dims == [3]


def test_writes_file_atomically_exports_in_eval_and_restores_flags(tmp_path) -> None:
    model = _net("bn")
    model.norm.train()  # left in training mode by mistake
    out = tmp_path / "m.onnx"
    res = nf.export_onnx(model, (_x(),), out)
    assert res.path == out and out.exists() and res.size_bytes == out.stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary folder left behind
    assert model.norm.training and not model.conv.training  # flags as given
    assert any("training mode" in w and "norm" in w for w in res.warnings)
    onnx.checker.check_model(str(out))
    model.eval()
    _assert_runs_like(model, out, 2)  # exported in eval: running statistics, not batch statistics


def test_models_over_the_limit_are_written_with_external_data(tmp_path, monkeypatch) -> None:
    import normfold.export as export

    monkeypatch.setattr(export, "EXTERNAL_DATA_THRESHOLD", 1024)  # a 2 GB model in a unit test would take minutes
    model = _net("bn")
    with pytest.raises(UsageError, match="external data"):
        nf.export_onnx(model, (_x(),))
    out = tmp_path / "big.onnx"
    res = nf.export_onnx(model, (_x(),), out)
    assert res.external_data and res.model_proto is None
    data = tmp_path / "big.onnx.data"
    assert data.exists() and data.stat().st_size > 0
    assert res.size_bytes == out.stat().st_size + data.stat().st_size
    proto = onnx.load(str(out), load_external_data=False)
    assert any(init.data_location == onnx.TensorProto.EXTERNAL for init in proto.graph.initializer)
    _assert_runs_like(model, out, 2)
    # the file moves with its data file (the data file is referenced by name)
    moved = tmp_path / "sub"
    moved.mkdir()
    export.move_onnx(out, moved / "big.onnx")
    assert (moved / "big.onnx.data").exists() and not data.exists()
    _assert_runs_like(model, moved / "big.onnx", 2)


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # Python control flow on a value: torch.export cannot trace it
            return x * 2
        return x


def test_export_failure_is_an_export_error_that_says_what_to_do() -> None:
    with pytest.raises(ExportError, match="torch.onnx.export .dynamo. failed: .*; "):
        nf.export_onnx(DataDependent(), (_x(),))


def test_bad_arguments() -> None:
    with pytest.raises(UsageError):
        nf.export_onnx("not a model", (_x(),))  # type: ignore[arg-type]
    with pytest.raises(InputError, match="batch dimension"):
        nf.export_onnx(_net("none"), [[1, 2]])  # type: ignore[list-item]


def test_proto_helpers_on_a_hand_made_graph() -> None:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3])
    g = helper.make_graph([helper.make_node("Add", ["x", "y"], ["z"])], "g", [x, y], [z])
    m = helper.make_model(g)
    assert batch_dims(m) == ["N", 1]
    assert np.array_equal(np.array(nf.export.onnx_input_names(m)), np.array(["x", "y"]))
