"""The pass contract: PassResult, PassManager error naming, inplace and train/eval promises."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normfold as nf
from normfold.errors import PassError
from normfold.passes.base import Change, Pass, PassManager, PassResult, Skip


class _Renamer(Pass):
    name = "scale_weights"

    def call(self, module: nn.Module) -> PassResult:
        with torch.no_grad():
            module[0].weight.mul_(2)
        return PassResult(module, changes=[Change(self.name, "scale", ("0",), "doubled 0.weight")],
                          skipped=[Skip(self.name, ("1",), "not a Linear")])


class _Broken(Pass):
    name = "broken"

    def call(self, module: nn.Module) -> PassResult:
        raise ValueError("boom")


class _BadContract(Pass):
    name = "bad_contract"

    def call(self, module: nn.Module):  # type: ignore[override]
        return module


class _TrainsEverything(Pass):
    name = "flips_modes"

    def call(self, module: nn.Module) -> PassResult:
        module.train()
        return PassResult(module)


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Dropout())


def test_result_records_and_modified_flag() -> None:
    m = _model()
    r = _Renamer()(m)
    assert r.modified and len(r.changes) == 1 and len(r.skipped) == 1
    assert str(r.skipped[0]) == "1: not a Linear"
    assert not PassResult(m).modified
    assert r.to_dict()["changes"][0]["paths"] == ["0"]


def test_inplace_false_leaves_input_untouched_and_inplace_true_edits() -> None:
    m = _model()
    before = m[0].weight.clone()
    r = _Renamer()(m)
    assert torch.equal(m[0].weight, before)
    assert torch.equal(r.module[0].weight, before * 2)
    r2 = _Renamer()(m, inplace=True)
    assert r2.module is m and torch.equal(m[0].weight, before * 2)


def test_train_eval_flags_come_back_as_given() -> None:
    m = _model().eval()
    m[2].train()  # a mixed state must survive too
    r = _TrainsEverything()(m)
    assert [x.training for x in r.module.modules()] == [False, False, False, True]


def test_pass_manager_names_failing_pass_and_those_before() -> None:
    pm = PassManager([_Renamer(), _Broken()])
    with pytest.raises(PassError) as info:
        pm(_model())
    msg = str(info.value)
    assert "'broken' failed" in msg and "ValueError: boom" in msg and "scale_weights" in msg
    assert info.value.pass_name == "broken" and info.value.ran == ["scale_weights"]
    assert isinstance(info.value, nf.NormfoldError)


def test_pass_manager_concatenates_results_and_copies_once() -> None:
    m = _model()
    before = m[0].weight.clone()
    r = PassManager([_Renamer(), _Renamer()])(m)
    assert len(r.changes) == 2 and torch.equal(r.module[0].weight, before * 4)
    assert torch.equal(m[0].weight, before)


def test_contract_violation_is_addressed_to_the_pass_author() -> None:
    with pytest.raises(TypeError, match="must return a PassResult"):
        _BadContract()(_model())


def test_non_module_input_is_a_normfold_error() -> None:
    with pytest.raises(nf.NormfoldError, match="expected a torch.nn.Module"):
        _Renamer()("not a model")  # type: ignore[arg-type]


def test_pass_manager_raises_normfold_errors_unchanged() -> None:
    """An error that names its fix (inputs that do not fit the model) reaches the caller as raised, with its
    exit code, not wrapped as a failure of the pass."""
    from normfold.errors import InputError

    class _BadInputs:
        def __call__(self, module, *, inplace=False):
            raise InputError("--input-shape 1,3 does not fit the model: give 4 dimensions")

    with pytest.raises(InputError) as info:
        PassManager([_Renamer(), _BadInputs()])(_model())
    assert not isinstance(info.value, PassError) and info.value.exit_code == 2


_OFFSET = torch.arange(4.0).view(1, 4, 1, 1)


class _WithTensorConstant(torch.nn.Module):
    """A forward that uses a tensor that is neither a parameter nor a buffer: tracing it stores
    ``_tensor_constant0`` on the traced module, as on torchvision's MaxViT (22 of them)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + _OFFSET


@pytest.mark.parametrize("inplace", [False, True])
def test_tracing_leaves_no_tensor_constants_on_the_model(inplace: bool, tmp_path) -> None:
    from normfold.io import load_model, save_model
    from normfold.testing import randomize_batchnorm
    from normfold.verify import compare

    torch.manual_seed(0)
    m = _WithTensorConstant().eval()
    randomize_batchnorm(m, seed=0)
    x = torch.randn(2, 3, 8, 8)
    ref = m(x)
    r = nf.fold_batchnorm(m, inplace=inplace, example_inputs=x)
    assert len(r.changes) == 1
    for module in (r.module, m):
        assert not [k for k in vars(module) if k.startswith("_tensor_constant")]
    assert compare(ref, r.module(x)).passed
    # a model without them is one the safe format can describe (it refused `_tensor_constant0 holds a Tensor`)
    torch.save(_WithTensorConstant().state_dict(), tmp_path / "m.pt")
    source = load_model(tmp_path / "m.pt", arch="tests.passes.test_base:_WithTensorConstant")
    folded = nf.fold_batchnorm(source.module.eval(), example_inputs=x)
    out = save_model(folded.module, tmp_path / "folded.safetensors", source=source)
    assert compare(folded.module(x), nf.load(out, arch="tests.passes.test_base:_WithTensorConstant")(x)).passed
