"""Every command the README and examples/ show is run, as written, on small stand-ins for the user's files.

The fenced ``bash`` blocks of README.md and the ``run:`` steps of examples/github-actions-check.yml are
parsed here (a backslash continues a line, ``#`` starts a comment, ``&&`` chains commands); each
``normfold`` command runs in-process, in the order written, in a folder holding the files it names, and
must exit 0. Where a command names the user's own code or a full-size model, the substitutions below
swap in a small one, and they are the only edits made to a command; commands that install packages or
run the test suite are listed in SKIPPED with the reason; a command shown twice runs once.
examples/test_my_model.py is run with pytest.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from normfold.demo import build_demo_model
from normfold.testing import randomize_batchnorm
from tests.commands._cli import run_cli

ROOT = Path(__file__).resolve().parents[1]

#: text in a command -> what the test runs instead (the user's own factory, full-size shapes)
SUBSTITUTIONS: list[tuple[str, str]] = [
    ("pkg.mod:build", "normfold.demo:build_demo_model"),
    ("pkg.mod:factory", "normfold.demo:build_demo_model"),
    ("mypkg.models:build", "normfold.demo:build_demo_model"),
    ("torchvision.models:resnet50", "torchvision.models:resnet18"),
    ("torchvision.models:vit_b_16", "tests.test_readme_examples:tiny_vit"),
    ("--input-shape 2,3,224,224", "--input-shape 2,3,64,64"),
    ("--input-shape 1,3,224,224", "--input-shape 1,3,64,64"),
    ("--input-shape 4,3,224,224", "--input-shape 4,3,32,32"),
    ("--image-size 224", "--image-size 32"),
]

#: commands that are not normfold's, with the reason they are not run here
SKIPPED: dict[str, str] = {
    "pip": "installs packages: the tests run in the installed environment",
    "pytest": "runs this test suite, of which this test is part",
    "mkdir": "made by the test's setup (the folders exist)",
}


def tiny_vit() -> torch.nn.Module:
    """torchvision's VisionTransformer, small (the README converts vit_b_16)."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)


def _commands(text: str) -> list[list[str]]:
    """Shell text -> argv lists: continuation lines joined, comments dropped, ``&&`` chains split."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out: list[list[str]] = []
    for line in joined.splitlines():
        for sub in SUBSTITUTIONS:
            line = line.replace(*sub)
        words = shlex.split(line, comments=True)
        cmd: list[str] = []
        for w in words + ["&&"]:
            if w == "&&":
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(w)
    return out


def _readme_blocks() -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)


def _workflow_runs() -> list[str]:
    wf = yaml.safe_load((ROOT / "examples" / "github-actions-check.yml").read_text())
    return [step["run"] for job in wf["jobs"].values() for step in job["steps"] if "run" in step]


def _user_files(folder: Path) -> None:
    """Small stand-ins for every file the examples name, in ``folder``."""
    import safetensors.torch
    import torchvision
    import transformers
    from PIL import Image

    demo = build_demo_model(seed=0)
    torch.save(demo.state_dict(), folder / "model.pt")  # replaced by a resnet18 state_dict for those commands
    torch.save(build_demo_model(seed=1), folder / "whole_module.pt")
    torch.save(torch.randn(16, 3, 32, 32) * 2 + 0.5, folder / "batch.pt")
    import numpy as np

    np.savez(folder / "batch.npz", x=np.random.default_rng(0).normal(0.5, 2, (16, 3, 32, 32)).astype("float32"))
    for sub in ("new_domain", "images"):
        (folder / sub).mkdir()
        for i in range(4):
            Image.fromarray((torch.rand(40, 48, 3) * 255).byte().numpy()).save(folder / sub / f"{i}.png")
    for sub in ("deploy", "models", "build", "reports"):
        (folder / sub).mkdir()
    torch.save(demo.state_dict(), folder / "models" / "model.pt")
    r18 = randomize_batchnorm(torchvision.models.resnet18(num_classes=10))
    safetensors.torch.save_file({k: v.contiguous() for k, v in r18.state_dict().items()}, str(folder / "r18.safetensors"))
    torch.save(tiny_vit().state_dict(), folder / "vit.pt")
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    torch.manual_seed(0)
    randomize_batchnorm(transformers.ResNetForImageClassification(cfg)).save_pretrained(folder / "hf_resnet")


def _run_all(scripts: list[str], folder: Path, capsys, monkeypatch) -> list[str]:
    import torchvision

    _user_files(folder)
    monkeypatch.chdir(folder)
    ran: list[str] = []
    for script in scripts:
        for argv in _commands(script):
            if argv[0] in SKIPPED or shlex.join(argv) in ran:  # `normfold demo` is shown twice
                continue
            assert argv[0] == "normfold", f"an example runs {argv[0]!r}, which this test does not know: {argv}"
            if "torchvision.models:resnet18" in argv and "model.pt" in argv:
                # the README's model.pt there is a torchvision model's state_dict
                torch.save(randomize_batchnorm(torchvision.models.resnet18()).state_dict(), folder / "resnet.pt")
                argv = ["resnet.pt" if a == "model.pt" else a for a in argv]
            code, out, err = run_cli(argv[1:], capsys)
            assert code == 0, f"`{shlex.join(argv)}` exited {code}:\n{out[-3000:]}\n{err[-2000:]}"
            ran.append(shlex.join(argv))
    return ran


def test_parser_reads_continuations_comments_and_chains() -> None:
    cmds = _commands("pip install -e . && normfold demo   # comment\nnormfold check a.pt \\\n    --json r.json\n")
    assert cmds == [["pip", "install", "-e", "."], ["normfold", "demo"], ["normfold", "check", "a.pt", "--json",
                                                                          "r.json"]]


def test_every_readme_command_runs(tmp_path: Path, capsys, monkeypatch) -> None:
    blocks = _readme_blocks()
    assert len(blocks) >= 5
    ran = _run_all(blocks, tmp_path, capsys, monkeypatch)
    assert len(ran) >= 15  # every normfold line of the README
    assert (tmp_path / "report.xml").exists() and "\x1b" not in (tmp_path / "report.xml").read_text()


def test_github_actions_example_runs(tmp_path: Path, capsys, monkeypatch) -> None:
    ran = _run_all(_workflow_runs(), tmp_path, capsys, monkeypatch)
    assert [r.split()[1] for r in ran] == ["fold", "check"]
    assert (tmp_path / "reports" / "normfold.xml").exists() and (tmp_path / "build" / "model.onnx").exists()


def test_pytest_example_runs(capsys) -> None:
    # in this process (a second interpreter would import torch again): the example's three tests must pass
    code = pytest.main(["-q", "-p", "no:cacheprovider", str(ROOT / "examples" / "test_my_model.py")])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "3 passed" in out
