"""The probes on hand-made ONNX graphs and small eager models: each finding and each clean case."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from normfold.check.probes import (batch_dim_findings, batch_independence, node_scope, norm_op_lint,
                                   onnx_training_findings, training_modules)
from normfold.tolerances import policy

TOL = policy(torch.float32)


def _model(nodes, inits=(), opset=18, batch="N", inputs=("x",)):
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [batch, 4]) for n in inputs]
    out = helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)
    g = helper.make_graph(list(nodes), "g", ins, [out], initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _scoped(node, scope: str):
    """Attach the dynamo exporter's scope metadata to a node."""
    p = node.metadata_props.add()
    p.key = "pkg.torch.onnx.name_scopes"
    parts = scope.split(".")
    p.value = repr(["", *(".".join(parts[:i + 1]) for i in range(len(parts))), "op"])  # outer to inner, then the op
    return node


def _bn(training: int | None, name="bn"):
    kw = {} if training is None else {"training_mode": training}
    return helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name=name, **kw)


BN_INITS = [numpy_helper.from_array(np.ones(4, np.float32), n) for n in ("s", "v")] + \
           [numpy_helper.from_array(np.zeros(4, np.float32), n) for n in ("b", "m")]


def test_node_scope_from_metadata_and_from_torchscript_names() -> None:
    n = _scoped(helper.make_node("Relu", ["x"], ["y"]), "layer1.0.conv1")
    assert node_scope(n) == "layer1.0.conv1"
    assert node_scope(helper.make_node("Conv", ["x"], ["y"], name="/layer1/layer1.0/conv1/Conv")) == "layer1.0.conv1"
    assert node_scope(helper.make_node("Conv", ["x"], ["y"], name="/bn2/BatchNormalization")) == "bn2"
    assert node_scope(helper.make_node("Conv", ["x"], ["y"], name="node_Conv_3")) == ""


def test_batchnorm_training_mode_is_an_error_inference_mode_is_not() -> None:
    f = onnx_training_findings(_model([_bn(1)], BN_INITS))
    assert [x.severity for x in f] == ["error"] and "training_mode=1" in f[0].message
    assert onnx_training_findings(_model([_bn(0)], BN_INITS)) == []
    assert onnx_training_findings(_model([_bn(None)], BN_INITS)) == []


def test_dropout_findings_by_training_mode_input() -> None:
    ratio = numpy_helper.from_array(np.array(0.5, np.float32), "r")
    on = numpy_helper.from_array(np.array(True), "t")
    off = numpy_helper.from_array(np.array(False), "f")
    drop = lambda flag: helper.make_node("Dropout", ["x", "r"] + ([flag] if flag else []), ["y"],  # noqa: E731
                                         name="drop")
    err = onnx_training_findings(_model([drop("t")], [ratio, on]))
    assert [f.severity for f in err] == ["error"] and "training_mode=true" in err[0].message
    assert [f.severity for f in onnx_training_findings(_model([drop("f")], [ratio, off]))] == ["warning"]
    assert [f.severity for f in onnx_training_findings(_model([drop(None)], [ratio]))] == ["warning"]
    # a flag computed at run time (a graph input) is an error: nothing says it is off
    g = _model([drop("flag")], [ratio])
    g.graph.input.append(helper.make_tensor_value_info("flag", TensorProto.BOOL, []))
    assert [f.severity for f in onnx_training_findings(g)] == ["error"]


def test_random_ops_are_errors_and_subgraphs_are_searched() -> None:
    rnd = helper.make_node("RandomUniformLike", ["x"], ["y"], name="noise")
    assert "RandomUniformLike" in onnx_training_findings(_model([rnd]))[0].message
    then = helper.make_graph([helper.make_node("Bernoulli", ["x"], ["z"])], "then", [],
                             [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    cond = numpy_helper.from_array(np.array(True), "c")
    iff = helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=then)
    f = onnx_training_findings(_model([iff], [cond]))
    assert len(f) == 2 and all("Bernoulli" in x.message for x in f)


def test_fixed_batch_dimension_is_an_error() -> None:
    relu = helper.make_node("Relu", ["x"], ["y"])
    assert batch_dim_findings(_model([relu], batch="batch")) == []
    f = batch_dim_findings(_model([relu], batch=1))
    assert len(f) == 1 and f[0].severity == "error" and "fixed to 1" in f[0].message and "'x'" in f[0].where


def test_norm_lint_opset_semantics_and_leftover_batchnorm() -> None:
    gn = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=2, name="gn")
    inits = [numpy_helper.from_array(np.ones(4, np.float32), "s"), numpy_helper.from_array(np.zeros(4, np.float32), "b")]
    old = norm_op_lint(_model([gn], inits, opset=18))
    assert [f.severity for f in old] == ["error"] and "per group" in old[0].message
    assert norm_op_lint(_model([gn], inits, opset=21)) == []
    rms = helper.make_node("RMSNormalization", ["x", "s"], ["y"], name="rms")
    assert "opset 23" in norm_op_lint(_model([rms], inits[:1], opset=22))[0].message
    left = norm_op_lint(_model([_scoped(_bn(0), "layer1.bn")], BN_INITS))
    assert [f.severity for f in left] == ["warning"] and "layer1.bn" in left[0].message


def test_norm_lint_notes_decomposed_groupnorm_for_a_candidate() -> None:
    relu = helper.make_node("Relu", ["x"], ["y"])
    cand = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4))
    f = norm_op_lint(_model([relu], opset=18), cand)
    assert [x.severity for x in f] == ["warning"] and "opset 21" in f[0].message


def test_training_modules_names_sensitive_layers_first() -> None:
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Dropout(0.1)).eval()
    assert training_modules(m) == []
    m[1].train()
    m[2].train()
    f = training_modules(m)
    assert [x.where for x in f] == ["1", "2"]
    assert "BatchNorm2d" in f[0].message and "Dropout" in f[1].message
    m.train()
    f = training_modules(m)
    assert f[-1].where == "training flags" and "<model>" in f[-1].message


class MixBatch(nn.Module):
    """Eval-mode but batch-dependent: subtracts the batch mean (a normalization without running stats)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(0, keepdim=True)


class Scalar(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2, x.sum()


def _eager(model):
    def run(feed):
        with torch.no_grad():
            out = model(*feed)
        out = out if isinstance(out, tuple) else (out,)
        return {f"out.{i}": t for i, t in enumerate(out)}
    return run


def test_batch_independence_passes_for_a_per_sample_model() -> None:
    x = (torch.randn(3, 4) * 2 + 0.5,)
    p = batch_independence(_eager(nn.Linear(4, 2)), x, seed=0, tol=TOL)
    assert p.passed and set(p.comparisons) == {2, 8}  # passed: within the policy (TOL) at every batch size


def test_batch_independence_fails_for_a_batch_mixing_model() -> None:
    p = batch_independence(_eager(MixBatch()), (torch.randn(3, 4),), seed=0, tol=TOL)
    assert not p.passed and any("batch 2" in f for f in p.failures())


def test_batch_independence_reports_a_batch_size_that_cannot_run() -> None:
    def only_batch_one(feed):
        if feed[0].shape[0] != 1:
            raise RuntimeError("Got invalid dimensions for input: x")
        return {"out": feed[0] * 2}
    p = batch_independence(only_batch_one, (torch.randn(1, 4),), seed=0, tol=TOL)
    assert not p.passed and set(p.errors) == {2, 8} and "invalid dimensions" in p.errors[2]


def test_batch_independence_ignores_outputs_without_a_batch_dim_and_says_so() -> None:
    p = batch_independence(_eager(Scalar()), (torch.randn(2, 4),), seed=0, tol=TOL)
    assert p.passed and "out.1" in p.note


def test_batch_independence_with_token_ids_and_custom_sizes() -> None:
    emb = nn.Embedding(50, 8)
    ids = (torch.randint(0, 50, (2, 5)),)
    p = batch_independence(_eager(emb), ids, seed=3, tol=TOL, batch_sizes=(1, 3))
    assert p.passed and p.batch_sizes == [1, 3] and set(p.comparisons) == {3}


def test_batch_independence_reuses_the_stage_main_run() -> None:
    lin = nn.Linear(4, 2)
    seen: list[int] = []

    def run(feed):
        seen.append(feed[0].shape[0])
        with torch.no_grad():
            return {"out": lin(feed[0])}

    x = (torch.randn(2, 4),)
    with torch.no_grad():
        known = {"out": lin(x[0])}
    p = batch_independence(run, x, seed=0, tol=TOL, known=known)
    assert p.passed and seen == [1, 8] and set(p.comparisons) == {2, 8}
    # a wrong main run is caught like any other batch size
    p = batch_independence(run, x, seed=0, tol=TOL, known={"out": known["out"] + 1})
    assert not p.passed and any(f.startswith("batch 2") for f in p.failures())
