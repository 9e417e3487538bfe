"""Property: whatever the dataflow around a BatchNorm, fold_batchnorm never changes the eval outputs.

Hypothesis writes small random programs over 4-channel feature maps: convs
(grouped, depthwise, transposed, with and without bias), BatchNorms (affine or
not, with randomized statistics), activations, pools, residual adds, a conv
output read twice, gating, concatenations, BatchNorm after an activation or
after a concat. Each program becomes an nn.Module that torch.fx traces; the
folded model must match the original within :data:`normfold.tolerances.FOLD`,
whatever was folded or skipped, and every BatchNorm must be either folded or
skipped with a reason.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import normfold as nf
from normfold.tolerances import FOLD
from tests.conftest import assert_outputs_close, batchnorm_modules, randomize_bn_stats, run_counting

C = 4
X_SHAPE = (2, C, 6, 6)

_ACTS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU, "hardswish": nn.Hardswish, "tanh": nn.Tanh}


def _conv(kind: str, bias: bool, cin: int = C) -> nn.Module:
    if kind == "conv3":
        return nn.Conv2d(cin, C, 3, padding=1, bias=bias)
    if kind == "conv1":
        return nn.Conv2d(cin, C, 1, bias=bias)
    if kind == "dwconv":
        return nn.Conv2d(cin, C, 3, padding=1, groups=cin if cin == C else 1, bias=bias)
    if kind == "gconv":
        return nn.Conv2d(cin, C, 3, padding=1, groups=2, bias=bias)
    if kind == "reflectconv":
        return nn.Conv2d(cin, C, 3, padding=1, padding_mode="reflect", bias=bias)
    if kind == "convT":
        return nn.ConvTranspose2d(cin, C, 3, padding=1, groups=2, bias=bias)
    raise AssertionError(kind)


class Program(nn.Module):
    """Runs ``steps`` over a list of values; value 0 is the input, every step appends one value."""

    def __init__(self, steps: list[tuple], mods: dict[str, nn.Module]) -> None:
        super().__init__()
        self.steps = steps
        self.mods = nn.ModuleDict(mods)

    def forward(self, x: torch.Tensor) -> Any:
        v = [x]
        for op, args, key in self.steps:
            a = [v[i] for i in args]
            if op == "module":
                v.append(self.mods[key](a[0]))
            elif op == "add":
                v.append(a[0] + a[1])
            elif op == "gate":
                v.append(a[0] * torch.sigmoid(a[1]))
            elif op == "cat":  # 2C channels, brought back to C by the module (a conv, or BN then conv)
                v.append(self.mods[key](torch.cat([a[0], a[1]], dim=1)))
            elif op == "maxpool":
                v.append(F.max_pool2d(a[0], 3, 1, 1))
            elif op == "avgpool":
                v.append(F.avg_pool2d(a[0], 3, 1, 1))
            elif op == "relu":
                v.append(F.relu(a[0]))
            else:
                raise AssertionError(op)
        # the last value plus, sometimes, an earlier one: more fan-out
        return v[-1] if len(v) < 4 else (v[-1], v[len(v) // 2])


@st.composite
def programs(draw: st.DrawFn) -> Program:
    steps: list[tuple] = []
    mods: dict[str, nn.Module] = {}
    n_values = 1

    def pick(recent: bool = True) -> int:
        # mostly the latest value (chains), sometimes any earlier one (fan-out)
        if recent and draw(st.integers(0, 3)) > 0:
            return n_values - 1
        return draw(st.integers(0, n_values - 1))

    for i in range(draw(st.integers(2, 9))):
        op = draw(st.sampled_from(["conv", "conv", "conv_bn", "conv_bn", "conv_bn", "bn", "act", "add", "gate",
                                   "cat", "pool", "relu"]))
        key = f"m{i}"
        if op in ("conv", "conv_bn"):
            kind = draw(st.sampled_from(["conv3", "conv1", "dwconv", "gconv", "reflectconv", "convT"]))
            steps.append(("module", (pick(),), key))
            mods[key] = _conv(kind, draw(st.booleans()))
            n_values += 1
            if op == "conv_bn":
                steps.append(("module", (n_values - 1,), key + "bn"))
                mods[key + "bn"] = nn.BatchNorm2d(C, affine=draw(st.booleans()))
                n_values += 1
        elif op == "bn":  # a BatchNorm on whatever is there: the input, an activation, a sum, ...
            steps.append(("module", (pick(),), key))
            mods[key] = nn.BatchNorm2d(C, track_running_stats=draw(st.sampled_from([True, True, True, False])))
            n_values += 1
        elif op == "act":
            steps.append(("module", (pick(),), key))
            mods[key] = _ACTS[draw(st.sampled_from(sorted(_ACTS)))]()
            n_values += 1
        elif op in ("add", "gate"):
            steps.append((op, (pick(), pick(recent=False)), None))
            n_values += 1
        elif op == "cat":
            if draw(st.booleans()):
                mods[key] = nn.Sequential(nn.BatchNorm2d(2 * C), nn.Conv2d(2 * C, C, 1))
            else:
                mods[key] = _conv(draw(st.sampled_from(["conv1", "conv3"])), True, cin=2 * C)
            steps.append(("cat", (pick(), pick(recent=False)), key))
            n_values += 1
        elif op == "pool":
            steps.append((draw(st.sampled_from(["maxpool", "avgpool"])), (pick(),), None))
            n_values += 1
        else:
            steps.append(("relu", (pick(),), None))
            n_values += 1
    return Program(steps, mods)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs(), seed=st.integers(0, 2**16))
def test_fold_never_changes_eval_outputs(program: Program, seed: int) -> None:
    torch.manual_seed(seed)
    for m in program.modules():  # fresh weights for this seed
        if hasattr(m, "reset_parameters") and not isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_parameters()
    randomize_bn_stats(program, seed)
    program.eval()
    x = torch.randn(X_SHAPE, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5
    ref, n_ops = run_counting(program, (x,))

    result = nf.fold_batchnorm(program, example_inputs=(x,))

    out, n_after = run_counting(result.module, (x,))
    assert_outputs_close(out, ref, FOLD[torch.float32], what=f"steps {program.steps}")
    assert n_after <= n_ops
    n_bn = len(batchnorm_modules(program))
    handled = {p for c in result.changes for p in c.paths} | {p for s in result.skipped for p in s.paths}
    for path, _ in batchnorm_modules(program):
        assert path in handled, f"{path} neither folded nor skipped: {program.steps}"
    assert all(s.reason for s in result.skipped)
    if n_bn == 0:
        assert not result.modified
