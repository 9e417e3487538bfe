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
