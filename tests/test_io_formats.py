"""Model files in and out (normfold.io, normfold.recipe): every input route, safe outputs, round trips by outputs.

A round trip writes a rewritten model and reads it back with ``nf.load`` (no
unpickling): the reloaded model must compute what the rewritten one computes
(same weights, same ops: equal up to the rounding of a different kernel
choice, since freshly loaded tensors may sit at other alignments), and the
rewritten one what the original computes (the passes' own tolerance).
"""

from __future__ import annotations

import json
import os
import pickle
import stat
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import normfold as nf
from normfold.errors import ModelLoadError, UsageError
from normfold.io import arch_module, build_arch, check_output_path, default_output_path, load_model, parse_arch, save_model
from normfold.recipe import RecipeError
from tests.commands._cli import run_cli
from tests.conftest import randomize_bn_stats, run_eval

R18 = "torchvision.models:resnet18(num_classes=10)"
DEMO = "normfold.demo:build_demo_model(seed=3)"
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _same(a: nn.Module, b: nn.Module, inputs: tuple = (X,)) -> None:
    """The file held exactly the rewritten model: outputs equal up to kernel rounding (a few float32 ulps)."""
    xs, ys = _flat(run_eval(a, inputs)), _flat(run_eval(b, inputs))
    assert len(xs) == len(ys) and xs
    for x, y in zip(xs, ys):
        torch.testing.assert_close(x, y, atol=4 * torch.finfo(y.dtype).eps * float(y.abs().max()), rtol=0)


def assert_models_close(a: nn.Module, b: nn.Module, inputs: tuple) -> None:
    """An exact rewrite's outputs: float32 rounding only (what the passes' own tests hold them to)."""
    for x, y in zip(_flat(run_eval(a, inputs)), _flat(run_eval(b, inputs))):
        torch.testing.assert_close(x, y, atol=1e-4 * float(y.abs().max()), rtol=0)


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in _flat(o)]


@pytest.fixture(scope="module")
def r18(tmp_path_factory) -> tuple[Path, nn.Module]:
    """resnet18(num_classes=10) with random BatchNorm statistics, as a .safetensors state_dict."""
    from safetensors.torch import save_file
    import torchvision

    torch.manual_seed(0)
    model = randomize_bn_stats(torchvision.models.resnet18(num_classes=10)).eval()
    path = tmp_path_factory.mktemp("r18") / "r18.safetensors"
    save_file(model.state_dict(), str(path))
    return path, model


@pytest.fixture(scope="module")
def r18_folded(r18) -> tuple:
    """(file, original, LoadedModel, folded model): folded once for the tests that write it."""
    path, original = r18
    loaded = load_model(path, arch=R18)
    return path, original, loaded, nf.fold_batchnorm(loaded.module.eval(), example_inputs=(X,)).module


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, nn.Module]:
    """normfold's demo net (every fold pattern, small) as a .pt state_dict, built by a factory with arguments."""
    from normfold.demo import build_demo_model

    model = build_demo_model(seed=3).eval()
    path = tmp_path_factory.mktemp("demo") / "demo.pt"
    torch.save(model.state_dict(), path)
    return path, model


def _is_safetensors(path: Path) -> dict:
    """The safetensors header (8-byte length + JSON): proves the file is not a pickle."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n])


REWRITES = {
    "fold": lambda m: nf.fold_batchnorm(m, example_inputs=(X,)).module,
    "frozen": lambda m: nf.freeze_batchnorm(m).module,
    "groupnorm": lambda m: nf.batchnorm_to_groupnorm(m).module,
    "syncbn": lambda m: nf.to_syncbn(m).module,
}


def test_resnet18_fold_round_trip(r18_folded, tmp_path: Path) -> None:
    path, original, loaded, folded = r18_folded
    assert loaded.kind == "state_dict" and not loaded.recipe
    out = save_model(folded, default_output_path(loaded, "folded"), source=loaded)
    assert out.name == "r18.folded.safetensors"
    recipe = json.loads(_is_safetensors(out)["__metadata__"]["normfold_recipe"])
    assert recipe["base"] == {"arch": R18}
    assert {e["op"] for e in recipe["edits"]} == {"replace", "patch"}, "BN -> Identity, conv gained a bias"
    again = nf.load(out, arch=R18)
    assert [type(m) for m in again.modules()] == [type(m) for m in folded.modules()]
    _same(again, folded)
    assert_models_close(again, original, (X,))
    out.unlink()


@pytest.mark.parametrize("rewrite", sorted(REWRITES))
def test_every_rewrite_round_trips(rewrite: str, demo, tmp_path: Path) -> None:
    path, original = demo
    loaded = load_model(path, arch=DEMO)
    _same(loaded.module.eval(), original)
    rewritten = REWRITES[rewrite](loaded.module.eval())
    out = save_model(rewritten, tmp_path / f"demo.{rewrite}.safetensors", source=loaded)
    assert json.loads(_is_safetensors(out)["__metadata__"]["normfold_recipe"])["edits"], "edits recorded"
    again = nf.load(out, arch=DEMO)
    assert [type(m) for m in again.modules()] == [type(m) for m in rewritten.modules()]
    _same(again, rewritten)
    if rewrite != "groupnorm":  # exact rewrites: the reloaded model is the original model
        assert_models_close(again, original, (X,))
    assert load_model(out, arch=DEMO).recipe  # what check --candidate reads, with the same --arch


def test_pt_output_loads_with_weights_only(r18_folded, tmp_path: Path) -> None:
    path, original, loaded, folded = r18_folded
    out = save_model(folded, tmp_path / "r18.folded.pt", source=loaded)
    obj = torch.load(out, weights_only=True)  # no code runs: tensors and a JSON string
    assert set(obj) == {"state_dict", "normfold_recipe"}
    _same(nf.load(out, arch=R18), folded)


def test_pickle_only_on_request(demo, tmp_path: Path) -> None:
    path, _ = demo
    loaded = load_model(path, arch=DEMO)
    out = save_model(loaded.module, tmp_path / "whole.pt", source=loaded, pickle=True)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(out, weights_only=True)
    with pytest.raises(ModelLoadError, match="--trust"):
        load_model(out)
    _same(load_model(out, trust=True).module, loaded.module)
    assert default_output_path(loaded, "folded", pickle=True).suffix == ".pt"
    assert default_output_path(loaded, "folded").name == "demo.folded.safetensors"


def test_fp16_state_dict_keeps_its_dtype(demo, tmp_path: Path) -> None:
    _, original = demo
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in original.state_dict().items()}
    src = tmp_path / "half.pt"
    torch.save(half, src)
    loaded = load_model(src, arch=DEMO)
    assert {p.dtype for p in loaded.module.parameters()} == {torch.float16}
    frozen = nf.freeze_batchnorm(loaded.module.eval()).module
    out = save_model(frozen, default_output_path(loaded, "frozen"), source=loaded)
    assert out.name == "half.frozen.safetensors"
    assert {v["dtype"] for v in _is_safetensors(out).values() if isinstance(v, dict) and "dtype" in v} <= {"F16", "I64"}
    again = nf.load(out, arch=DEMO)
    assert {p.dtype for p in again.parameters()} == {torch.float16}
    _same(again, frozen, (X.half(),))


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_outputs_get_the_umask_permissions(mask: int, demo, tmp_path: Path) -> None:
    path, _ = demo
    loaded = load_model(path, arch=DEMO)
    old = os.umask(mask)
    try:
        out = save_model(loaded.module, tmp_path / "copy.safetensors", source=loaded)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["copy.safetensors"], "temporary file left behind"


def _tiny_bert(path: Path):
    import transformers

    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(cfg).eval()
    model.save_pretrained(path)
    return model


def test_hugging_face_folder_in_and_out(tmp_path: Path) -> None:
    original = _tiny_bert(tmp_path / "bert")
    ids = (torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1)),)
    loaded = load_model(tmp_path / "bert")
    assert loaded.kind == "hf" and loaded.hf_class == "BertForMaskedLM"
    _same(loaded.module, original, ids)
    rewritten = nf.layernorm_to_rmsnorm(loaded.module, mode="approx", example_inputs=ids).module
    assert not any(isinstance(m, nn.LayerNorm) for m in rewritten.modules())
    out = save_model(rewritten, default_output_path(loaded, "rmsnorm"), source=loaded)
    assert out == tmp_path / "bert.rmsnorm" and sorted(p.name for p in out.iterdir()) == ["config.json",
                                                                                         "model.safetensors"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~_umask()
    again = nf.load(out)
    assert type(again).__name__ == "BertForMaskedLM"
    _same(again, rewritten, ids)
    # tied weights stay tied (stored once in the file)
    emb = again.bert.embeddings.word_embeddings.weight
    assert again.cls.predictions.decoder.weight.data_ptr() == emb.data_ptr()
    with pytest.raises(ModelLoadError, match="load the folder"):
        load_model(out / "model.safetensors")
    # writing again replaces normfold's own folder; a foreign folder is refused
    save_model(rewritten, out, source=loaded)
    (tmp_path / "other").mkdir()
    with pytest.raises(UsageError, match="existing directory"):
        save_model(rewritten, tmp_path / "other", source=loaded)
    with pytest.raises(UsageError, match="folder"):
        save_model(rewritten, tmp_path / "x.safetensors", source=loaded)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_hugging_face_folder_through_the_cli(tmp_path: Path, capsys) -> None:
    """`normfold fold DIR` on a transformers ResNet: a folder comes out, and check reads it as the candidate."""
    import transformers

    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    torch.manual_seed(0)
    model = randomize_bn_stats(transformers.ResNetForImageClassification(cfg)).eval()
    model.save_pretrained(tmp_path / "resnet")
    code, out, err = run_cli(["fold", str(tmp_path / "resnet"), "--input-shape", "2,3,32,32", "-q"], capsys)
    assert code == 0, out + err
    folded_dir = tmp_path / "resnet.folded"
    assert (folded_dir / "config.json").is_file() and (folded_dir / "model.safetensors").is_file()
    folded = nf.load(folded_dir)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert_models_close(folded, model, (X,))
    code, out, err = run_cli(["check", str(tmp_path / "resnet"), "--candidate", str(folded_dir), "--input-shape",
                              "2,3,32,32", "--no-export", "-q"], capsys)
    assert code == 0, out + err


def test_hugging_face_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="without config.json"):
        load_model(tmp_path / "empty")
    d = tmp_path / "noweights"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(d)
    (d / "config.json").write_text(json.dumps({"architectures": ["NotAModel"], "model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="not a transformers model class"):
        load_model(d)


def test_timm_registry_name(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(0)
    model = randomize_bn_stats(timm.create_model("test_resnet", pretrained=False, num_classes=5)).eval()
    src = tmp_path / "t.pt"
    torch.save(model.state_dict(), src)
    loaded = load_model(src, arch="timm:test_resnet(num_classes=5)")
    _same(loaded.module.eval(), model)
    folded = nf.fold_batchnorm(loaded.module.eval(), example_inputs=(X,)).module
    out = save_model(folded, default_output_path(loaded, "folded"), source=loaded)
    _same(nf.load(out, arch="timm:test_resnet(num_classes=5)"), folded)
    with pytest.raises(ModelLoadError, match="timm has no model"):
        load_model(src, arch="timm:no_such_net")
    with pytest.raises(ModelLoadError, match="--arch timm:test_resnet"):
        load_model(src, arch="timm.layers:test_resnet")


_LOCAL_FACTORY = '''
import torch
from torch import nn


class Shift(nn.Module):
    """Adds a constant the module computes when built: a non-persistent buffer (not in the state_dict)."""

    def __init__(self, width, step=0.5):
        super().__init__()
        self.register_buffer("offset", torch.arange(width, dtype=torch.float32).view(1, -1, 1, 1) * step,
                             persistent=False)

    def forward(self, x):
        return x + self.offset


def build(width=4):
    conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, width, 3))
    return nn.Sequential(conv, nn.BatchNorm2d(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, 2))
'''


def test_factory_in_a_local_file_with_arguments(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "my_models.py").write_text(_LOCAL_FACTORY)
    monkeypatch.chdir(tmp_path)
    arch = "./my_models.py:build(width=6)"
    torch.manual_seed(0)
    model = randomize_bn_stats(load_model_factory(arch)).eval()
    src = tmp_path / "m.safetensors"
    from safetensors.torch import save_file
    save_file(model.state_dict(), str(src))
    loaded = load_model(src, arch=arch)
    _same(loaded.module.eval(), model)
    # weight_norm baked, then BatchNorm folded: parametrizations removed and BN gone, all in the recipe
    baked = nf.fold_weight_norm(loaded.module.eval()).module
    folded = nf.fold_batchnorm(baked, example_inputs=(X,)).module
    out = save_model(folded, default_output_path(loaded, "folded"), source=loaded)
    again = nf.load(out, arch=arch)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in again.modules())
    assert not hasattr(again[0], "parametrizations")
    _same(again, folded)
    assert_models_close(again, model, (X,))
    # the module name alone is not importable from here: the error says how
    with pytest.raises(ModelLoadError, match=r"PYTHONPATH=\. or give the file path"):
        load_model(src, arch="my_models:build(width=6)")


def test_non_persistent_buffers_of_new_modules_travel_with_the_weights(tmp_path: Path, monkeypatch) -> None:
    """A module swapped in with a buffer outside the state_dict: its values are written, not rebuilt."""
    (tmp_path / "my_models.py").write_text(_LOCAL_FACTORY)
    monkeypatch.chdir(tmp_path)
    arch = "./my_models.py:build(width=6)"
    loaded_model = load_model_factory(arch).eval()
    src = tmp_path / "m.pt"
    torch.save(loaded_model.state_dict(), src)
    loaded = load_model(src, arch=arch)
    factory_module = sys.modules[arch_module(arch)]
    shifted = loaded.module
    shifted[1] = factory_module.Shift(6, step=0.25)  # a value a fresh Shift(6) would not have
    out = save_model(shifted, tmp_path / "m.shift.safetensors", source=loaded)
    recipe = json.loads(_is_safetensors(out)["__metadata__"]["normfold_recipe"])
    assert any(e.get("class") == "@factory:Shift" for e in recipe["edits"]), "named apart from where the file lies"
    # read back from another folder, through another path to the same file
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    arch = "../my_models.py:build(width=6)"
    again = nf.load(out, arch=arch)
    assert torch.equal(again[1].offset, shifted[1].offset) and "offset" not in again.state_dict()
    _same(again, shifted)


def load_model_factory(arch: str) -> nn.Module:
    from normfold.io import build_arch

    return build_arch(arch)


def test_arch_arguments_are_literals_only() -> None:
    spec = parse_arch("torchvision.models:resnet18(num_classes=10, weights=None)")
    assert (spec.module, spec.attr, spec.kwargs) == ("torchvision.models", "resnet18", {"num_classes": 10,
                                                                                      "weights": None})
    with pytest.raises(UsageError, match="literals"):
        parse_arch("torchvision.models:resnet18(num_classes=__import__('os').getpid())")
    with pytest.raises(UsageError, match="must look like"):
        parse_arch("resnet18")


def test_torchscript_is_refused(tmp_path: Path, capsys) -> None:
    p = tmp_path / "scripted.pt"
    torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()).save(str(p))
    with pytest.raises(ModelLoadError, match="TorchScript"):
        load_model(p, trust=True)
    code, out, err = run_cli(["fold", str(p), "--trust"], capsys)
    assert code == 2 and "TorchScript" in err and "Traceback" not in err


def test_pt2_in_and_out(demo, tmp_path: Path) -> None:
    path, _ = demo
    loaded = load_model(path, arch=DEMO)
    folded = nf.fold_batchnorm(loaded.module.eval(), example_inputs=(X,)).module
    with pytest.raises(UsageError, match="example inputs"):
        save_model(folded, tmp_path / "f.pt2", source=loaded)
    out = save_model(folded, tmp_path / "f.pt2", source=loaded, example_inputs=(X,))
    program = load_model(out)
    assert program.kind == "exported"
    with torch.no_grad():  # an ExportedProgram's module has no eval(); it was exported in eval
        torch.testing.assert_close(program.module(X), run_eval(folded, (X,)), atol=1e-5, rtol=0)
    assert default_output_path(program, "folded").suffix == ".pt2"


def test_recipe_refuses_what_it_cannot_rebuild(demo, tmp_path: Path) -> None:
    path, _ = demo
    loaded = load_model(path, arch=DEMO)
    model = loaded.module
    model.fc = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(32, 64)))
    with pytest.raises(RecipeError, match="--pickle"):
        save_model(model, tmp_path / "g.safetensors", source=loaded)
    model.fc = nn.Linear(32, 64)
    model.fc.scale_fn = lambda t: t * 2  # an attribute a file cannot describe
    with pytest.raises(RecipeError, match="--pickle"):
        save_model(model, tmp_path / "g.safetensors", source=loaded)
    assert not any(tmp_path.iterdir())


def test_a_tampered_recipe_imports_nothing_outside_the_allow_list(r18_folded, tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    path, _, loaded, folded = r18_folded
    out = save_model(folded, tmp_path / "f.safetensors", source=loaded)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    recipe = json.loads(meta["normfold_recipe"])
    replace = next(e for e in recipe["edits"] if e["op"] == "replace")
    replace["class"] = "subprocess:Popen"
    meta["normfold_recipe"] = json.dumps(recipe)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ModelLoadError, match="refusing to import"):
        nf.load(bad, arch=R18)


def test_cli_fold_safetensors_then_check_the_candidate(r18, tmp_path: Path, capsys) -> None:
    """The issue's first example: fold a .safetensors, then check the output as --candidate."""
    path, original = r18
    src = tmp_path / "r18.safetensors"
    src.write_bytes(path.read_bytes())
    code, out, err = run_cli(["fold", str(src), "--arch", R18, "--input-shape", "2,3,32,32", "-q"], capsys)
    assert code == 0, out + err
    written = tmp_path / "r18.folded.safetensors"
    assert _is_safetensors(written) and str(written) in out
    code, out, err = run_cli(["check", str(src), "--arch", R18, "--candidate", str(written), "--input-shape",
                              "2,3,32,32", "--no-export", "-q"], capsys)
    assert code == 0, out + err
    assert_models_close(nf.load(written, arch=R18), original, (X,))


def test_pickled_input_stays_pickled_unless_arch_is_given(demo, tmp_path: Path) -> None:
    """A pickled module without --arch has no factory to rebuild it: its output is pickled too (it was trusted)."""
    _, original = demo
    src = tmp_path / "whole.pt"
    torch.save(original, src)
    loaded = load_model(src, trust=True)
    frozen = nf.freeze_batchnorm(loaded.module).module
    assert default_output_path(loaded, "frozen").name == "whole.frozen.pt"
    out = save_model(frozen, default_output_path(loaded, "frozen"), source=loaded)
    _same(load_model(out, trust=True).module, frozen)
    with pytest.raises(UsageError, match="pass --arch"):
        save_model(frozen, tmp_path / "w.safetensors", source=loaded)
    with_arch = load_model(src, trust=True, arch=DEMO)
    assert default_output_path(with_arch, "frozen").suffix == ".safetensors"
    _same(nf.load(save_model(frozen, tmp_path / "w.safetensors", source=with_arch), arch=DEMO), frozen)
    program = torch.export.export(original, (X,), strict=False)
    exported = tmp_path / "p.pt2"
    torch.export.save(program, str(exported))
    with pytest.raises(UsageError, match="write the result as .pt2"):
        save_model(frozen, tmp_path / "p.safetensors", source=load_model(exported))


def test_cli_pickle_and_pt2_outputs_on_request(demo, tmp_path: Path, capsys) -> None:
    path, original = demo
    base = ["fold", str(path), "--arch", DEMO, "--input-shape", "2,3,32,32", "-q"]
    code, out, err = run_cli(base + ["--pickle", "-o", str(tmp_path / "whole.pt")], capsys)
    assert code == 0, out + err
    whole = torch.load(tmp_path / "whole.pt", weights_only=False)
    assert isinstance(whole, nn.Module)
    code, out, err = run_cli(base + ["-o", str(tmp_path / "f.pt2")], capsys)
    assert code == 0, out + err
    program = load_model(tmp_path / "f.pt2").program
    with torch.no_grad():
        torch.testing.assert_close(program.module()(X), run_eval(whole, (X,)), atol=1e-5, rtol=0)


def test_check_output_path_is_the_one_rule(tmp_path: Path) -> None:
    """Every refusal names the flag the caller gave; a good path comes back as a Path and leaves nothing behind."""
    model = tmp_path / "m.pt"
    model.write_bytes(b"x")
    assert check_output_path(str(tmp_path / "r.json"), [str(model), None], flag="--json") == tmp_path / "r.json"
    assert list(tmp_path.iterdir()) == [model]  # the write probe is removed
    with pytest.raises(UsageError, match=r"^--save-onnx .*give the ONNX file a \.onnx suffix"):
        check_output_path(tmp_path / "m.txt", flag="--save-onnx", suffix=".onnx", what="ONNX file")
    with pytest.raises(UsageError, match=r"^-o .*refusing to overwrite the input"):
        check_output_path(model, [None, model], flag="-o")
    with pytest.raises(UsageError, match=r"^--json .*existing directory"):
        check_output_path(tmp_path, model, flag="--json")
    with pytest.raises(UsageError, match=r"^--junit-xml .*folder .* does not exist"):
        check_output_path(tmp_path / "no" / "r.xml", (), flag="--junit-xml")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            with pytest.raises(UsageError, match=r"^-o .*cannot write in"):
                check_output_path(locked / "m.safetensors", model, flag="-o")
        finally:
            locked.chmod(0o700)


def test_hugging_face_offline_mode_only_while_a_folder_is_read(tmp_path: Path, monkeypatch) -> None:
    """Loading a Hugging Face folder runs offline, then leaves the caller's environment as it found it."""
    import huggingface_hub.constants as hub

    from normfold.io import _hf_offline

    _tiny_bert(tmp_path / "bert")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    seen = {}
    real_hf_class = nf.io._hf_class

    def spy(p):
        seen.update(env=(os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE")),
                    hub=hub.HF_HUB_OFFLINE)
        return real_hf_class(p)

    monkeypatch.setattr(nf.io, "_hf_class", spy)
    loaded = load_model(tmp_path / "bert")
    assert seen == {"env": ("1", "1"), "hub": True}  # offline while the folder is read
    assert os.environ["HF_HUB_OFFLINE"] == "0" and "TRANSFORMERS_OFFLINE" not in os.environ
    assert hub.HF_HUB_OFFLINE is False
    # saving rebuilds the base from the folder (offline too) and restores again; nested blocks restore once
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "no")
    with _hf_offline():
        save_model(loaded.module, tmp_path / "copy", source=loaded)
        assert os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert os.environ["TRANSFORMERS_OFFLINE"] == "no" and os.environ["HF_HUB_OFFLINE"] == "0"
    assert hub.HF_HUB_OFFLINE is False


def test_skipping_init_during_a_load_is_per_thread() -> None:
    """While one thread builds a model for a strict load (init skipped), another thread's init still runs."""
    import threading

    from normfold.io import _skip_init

    originals = {n: getattr(torch.nn.init, n) for n in ("constant_", "kaiming_uniform_", "zeros_")}
    inside, release, done = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def loader() -> None:
        with _skip_init():
            seen["skipped"] = torch.nn.init.constant_(torch.zeros(3), 5.0).sum().item()
            inside.set()
            release.wait(10)
        done.set()

    t = threading.Thread(target=loader)
    t.start()
    assert inside.wait(10)
    try:
        # this thread is not loading: its init runs while the other thread skips
        assert torch.nn.init.constant_(torch.zeros(3), 2.0).sum().item() == 6.0
        with _skip_init():  # overlapping blocks: the first to leave does not restore under the other
            release.set()
            assert done.wait(10)
            assert torch.nn.init.constant_(torch.zeros(3), 2.0).sum().item() == 0.0
        assert torch.nn.init.constant_(torch.zeros(3), 2.0).sum().item() == 6.0
    finally:
        release.set()
        t.join(10)
    assert seen["skipped"] == 0.0
    assert all(getattr(torch.nn.init, n) is f for n, f in originals.items())  # the originals are back


def test_a_partial_of_an_allowed_class_is_recorded_and_replayed(demo, tmp_path: Path) -> None:
    """functools.partial(nn.LayerNorm, eps=1e-6): the class by name from the allow-list, literal arguments."""
    import functools

    from safetensors import safe_open
    from safetensors.torch import save_file

    path, _ = demo
    loaded = load_model(path, arch=DEMO)
    model = loaded.module
    model.fc = nn.Sequential(nn.Linear(32, 64))  # a replaced module: all its attributes are recorded
    model.fc.norm_layer = functools.partial(nn.LayerNorm, (64,), eps=1e-6, dtype=torch.float64)
    out = save_model(model, tmp_path / "p.safetensors", source=loaded)
    again = nf.load(out, arch=DEMO)
    p = again.fc.norm_layer
    assert type(p) is functools.partial and p.func is nn.LayerNorm
    assert p.args == ((64,),) and p.keywords == {"eps": 1e-6, "dtype": torch.float64}
    _same(again, model)
    # a partial of anything outside the allow-list is refused, as the callable alone would be
    model.fc.norm_layer = functools.partial(os.path.join, "a")
    with pytest.raises(RecipeError, match="--pickle"):
        save_model(model, tmp_path / "q.safetensors", source=loaded)
    # a tampered file: the partial's callable goes through the same allow-list, and must be named as one
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for func, message in (({"__object__": "os:system"}, "refusing to import"), ("os:system", "not of an allowed")):
        recipe = json.loads(meta["normfold_recipe"])
        edit = next(e for e in recipe["edits"] if e["path"] == "fc")
        edit["attrs"]["norm_layer"]["__partial__"]["func"] = func
        bad = tmp_path / "bad.safetensors"
        save_file(tensors, str(bad), metadata={**meta, "normfold_recipe": json.dumps(recipe)})
        with pytest.raises(ModelLoadError, match=message):
            nf.load(bad, arch=DEMO)


def test_torchvision_vit_converted_to_rmsnorm_saves_without_pickle(tmp_path: Path) -> None:
    """torchvision's ViT keeps ``norm_layer = partial(nn.LayerNorm, eps=1e-6)``: a safe file records it."""
    arch = "tests.test_readme_examples:tiny_vit"
    src = tmp_path / "vit.pt"
    torch.save(build_arch(arch).state_dict(), src)
    loaded = load_model(src, arch=arch)
    x = (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)
    result = nf.layernorm_to_rmsnorm(loaded.module, mode="auto", example_inputs=x)
    out = save_model(result.module, tmp_path / "vit.rmsnorm.safetensors", source=loaded)
    again = nf.load(out, arch=arch)
    assert not any(isinstance(m, nn.LayerNorm) for m in again.modules())
    _same(again, result.module, x)


def test_module_versions_survive_a_state_dict_and_a_safe_file(tmp_path: Path, capsys) -> None:
    """torchvision's MNASNet loads only with its version in the state_dict's ``_metadata`` (found by the CLI sweep)."""
    arch = "torchvision.models:mnasnet0_5"
    model = randomize_bn_stats(build_arch(arch), 0).eval()
    src = tmp_path / "mn.pt"
    torch.save(model.state_dict(), src)  # a .pt keeps _metadata; the safe file normfold writes does not
    code, out, err = run_cli(["fold", str(src), "--arch", arch, "--input-shape", "1,3,64,64", "-q"], capsys)
    assert code == 0, out + err
    written = tmp_path / "mn.folded.safetensors"
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert nf.verify(model, nf.load(written, arch=arch), (x,)).passed


class _GatedSE(nn.Module):
    """A squeeze-excite that keeps its gate function: ``torch.sigmoid`` lies outside the recipe's allow-list."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // 2, 1)
        self.fc2 = nn.Conv2d(c // 2, c, 1)
        self.gate = torch.sigmoid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class _RepBlock(nn.Module):
    """3x3 conv+BN + 1x1 conv+BN + identity BN, then the SE and a ReLU: merges into Sequential(merged_conv, se, act)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.pointwise = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.identity = nn.BatchNorm2d(c)
        self.se = _GatedSE(c)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.se(self.dense(x) + self.pointwise(x) + self.identity(x)))


def rep_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _RepBlock(8), _RepBlock(8), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 2))


def test_merged_blocks_save_with_their_own_children_moved_not_recorded(tmp_path: Path) -> None:
    """A merged block's SE and activation are the fresh build's modules moved under the Sequential ("take").

    The SE holds ``torch.sigmoid``, which a "replace" record may not name (outside torch.nn, normfold and
    the model's modules): the file is written only because the recipe moves the fresh build's SE, which
    holds the same function, instead of rebuilding it.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    arch = f"{__name__}:rep_net"
    torch.manual_seed(0)
    model = randomize_bn_stats(rep_net()).eval()
    src = tmp_path / "rep.pt"
    torch.save(model.state_dict(), src)
    loaded = load_model(src, arch=arch)
    merged = nf.fold_batchnorm(loaded.module.eval(), example_inputs=(X,), merge_branches=True).module
    assert [list(merged[i]._modules) for i in (1, 2)] == [["merged_conv", "se", "act"]] * 2
    out = save_model(merged, tmp_path / "rep.safetensors", source=loaded)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    recipe = json.loads(meta["normfold_recipe"])
    ops = {e["path"]: e["op"] for e in recipe["edits"]}
    assert {p: ops.get(p) for p in ("1", "1.merged_conv", "1.se", "1.act", "2.se")} == {
        "1": "replace", "1.merged_conv": "replace", "1.se": "take", "1.act": "take", "2.se": "take"}
    assert not any(p.startswith("1.se.") for p in ops)  # the SE's children came with it, unchanged
    again = nf.load(out, arch=arch)
    assert again[1].se is not merged[1].se and type(again[1].se) is _GatedSE
    _same(again, merged)
    assert_models_close(again, model, (X,))

    # a move of a module the build does not have is a damaged file, said in one line
    take = next(e for e in recipe["edits"] if e["op"] == "take")
    take["from"] = "7.se"
    meta["normfold_recipe"] = json.dumps(recipe)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ModelLoadError, match="moves '7.se'"):
        nf.load(bad, arch=arch)


def test_recipe_versions_one_and_two_are_read_and_later_ones_refused(r18_folded, tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    path, original, loaded, folded = r18_folded
    out = save_model(folded, tmp_path / "f.safetensors", source=loaded)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    recipe = json.loads(meta["normfold_recipe"])
    for version, fine in ((1, True), (2, True), (3, False)):
        recipe["version"] = version
        meta["normfold_recipe"] = json.dumps(recipe)
        f = tmp_path / f"v{version}.safetensors"
        save_file(tensors, str(f), metadata=meta)
        if fine:
            _same(nf.load(f, arch=R18), folded)
        else:
            with pytest.raises(ModelLoadError, match="upgrade normfold"):
                nf.load(f, arch=R18)


def test_safetensors_tensors_are_read_aligned(tmp_path) -> None:
    """A tensor that starts at an odd offset of the file comes back 64-byte aligned (CPU kernels round
    differently on unaligned weights, so a loaded model would not be bit-identical to the one saved)."""
    from safetensors.torch import save_file

    from normfold.io import _read_safetensors

    save_file({"a": torch.zeros(3, dtype=torch.uint8), "b": torch.randn(5, 7)}, str(tmp_path / "odd.safetensors"))
    state, _ = _read_safetensors(tmp_path / "odd.safetensors")
    assert all(t.data_ptr() % 64 == 0 for t in state.values())
    assert state["b"].shape == (5, 7)


class _CachingBlock(torch.nn.Module):
    """A forward that caches a tensor computed from a parameter in a dict, as timm's LeViT does with its
    ``attention_bias_cache`` (filled by an eval forward, refilled when empty)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.bias = torch.nn.Parameter(torch.randn(4))
        self.bias_cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = str(x.device)
        if key not in self.bias_cache:
            self.bias_cache[key] = self.bias.view(1, 4, 1, 1) * 2
        return self.bn(self.conv(x)) + self.bias_cache[key]


def test_a_forward_cache_is_not_recorded(tmp_path) -> None:
    """A dict a forward filled with tensors (empty in a fresh build) is a cache: the safe file does not
    record it, the loaded model refills it (it refused `bias_cache['cpu'] holds a Tensor`, as on levit_128s)."""
    from normfold.io import load_model, save_model
    from normfold.testing import randomize_batchnorm

    torch.manual_seed(0)
    torch.save(_CachingBlock().state_dict(), tmp_path / "m.pt")
    arch = "tests.test_io_formats:_CachingBlock"
    source = load_model(tmp_path / "m.pt", arch=arch)
    model = source.module.eval()
    randomize_batchnorm(model, seed=0)
    x = torch.randn(2, 3, 8, 8)
    folded = nf.fold_batchnorm(model, example_inputs=x)
    folded.module(x)
    assert folded.module.bias_cache
    out = save_model(folded.module, tmp_path / "folded.safetensors", source=source)
    loaded = nf.load(out, arch=arch).eval()
    assert not loaded.bias_cache
    assert nf.verify(model, loaded, x).passed
