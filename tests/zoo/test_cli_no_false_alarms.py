"""No false alarms through the command line: correct folds and conversions of real models exit 0.

The small representative part of benchmarks/false_alarms.py (which sweeps
every torchvision classification model and timm models with BatchNorm):
torchvision resnet50 (the old elementwise rule refused its fold), timm
regnetz_b16 (refused on 4 of 4 seeds) and resnet18 with its classifier
scaled by 1000 (refused at 3.9e-7 of the output's scale), each with random
weights and randomized BatchNorm statistics and affine parameters, through
``normfold fold`` and ``normfold convert --to frozen``, on a pickled module
and on a state_dict with ``--arch``. Each must exit 0 with the rule and a
margin of at least 2 printed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision

from normfold.testing import randomize_batchnorm
from tests.commands._cli import run_cli

pytestmark = [pytest.mark.zoo, pytest.mark.filterwarnings("ignore")]

VERDICT = re.compile(r"max \|a - b\| (\S+) <= 2e-05 x scale (\S+) \(margin (\S+?)x\)")


def _build(name: str, head: float) -> tuple[torch.nn.Module, str]:
    if name.startswith("timm:"):
        import timm

        model, arch = timm.create_model(name[5:], pretrained=False), name
    else:
        model, arch = torchvision.models.get_model(name, weights=None), f"torchvision.models:{name}"
    torch.manual_seed(0)
    randomize_batchnorm(model, seed=0)
    if head != 1.0:
        fc = model.get_submodule("fc")
        with torch.no_grad():
            fc.weight.mul_(head)
            fc.bias.mul_(head)
    return model, arch


CASES = [("resnet50", 1.0, "pickle", "fold"), ("resnet50", 1.0, "state_dict", "convert"),
         ("timm:regnetz_b16", 1.0, "pickle", "fold"), ("timm:regnetz_b16", 1.0, "pickle", "convert"),
         ("resnet18", 1000.0, "pickle", "fold"), ("resnet18", 1000.0, "state_dict", "fold"),
         ("resnet18", 1000.0, "pickle", "convert")]


@pytest.mark.parametrize("name,head,kind,command", CASES,
                         ids=[f"{n.replace('timm:', '')}-x{h:g}-{k}-{c}" for n, h, k, c in CASES])
def test_correct_rewrite_exits_0(name: str, head: float, kind: str, command: str, tmp_path: Path, capsys,
                                 monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # the comparison table is read back: no wrapping
    model, arch = _build(name, head)
    if kind == "pickle":
        path = tmp_path / "model.pt"
        torch.save(model.eval(), path)
        source = [str(path), "--trust"]
    else:
        path = tmp_path / "sd.pt"
        torch.save(model.state_dict(), path)
        source = [str(path), "--arch", arch]
    argv = [command, source[0]] + (["--to", "frozen"] if command == "convert" else []) + source[1:] + \
        ["--input-shape", "2,3,64,64", "-o", str(tmp_path / "out.pt")]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, f"{' '.join(argv)} exited {code}:\n{out}\n{err}"
    verdicts = VERDICT.findall(out)
    assert verdicts, f"no verdict with the rule and the margin printed:\n{out}"
    for _, scale, margin in verdicts:
        assert float(margin) >= 2.0, f"a correct rewrite too close to the bound (margin {margin}x):\n{out}"
        if head != 1.0:
            assert float(scale) > 100.0  # the scaled head is what the bound is relative to
