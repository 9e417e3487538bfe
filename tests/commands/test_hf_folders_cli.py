"""Hugging Face save_pretrained folders through the CLI: convert --to rmsnorm, export, check, fold, inspect.

The models are tiny GPT-2 (token ids + attention mask as keyword inputs), ViT and ResNet (pixel_values) built
from small configs with random weights (and, for ResNet, random BatchNorm statistics); every output is compared
with the original's through :func:`normfold.verify.compare`, the one rule.
"""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch

import normfold as nf
from normfold.inputs import DEFAULT_IMAGE_SIZE, hf_example_inputs
from normfold.verify import compare

from ._cli import run_cli

transformers = pytest.importorskip("transformers")


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _vit() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=32, patch_size=8, num_labels=5)
    return transformers.ViTForImageClassification(cfg).eval()


def _resnet() -> torch.nn.Module:
    """transformers' ResNet (BatchNorm after every conv), its BatchNorms given statistics a fold must use."""
    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                                    num_labels=3)
    model = transformers.ResNetForImageClassification(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


def _logits(model: torch.nn.Module, kw: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**kw).logits


def _same(candidate: torch.Tensor, reference: torch.Tensor) -> None:
    v = compare(reference, candidate)
    assert v.passed, v.describe()


@pytest.fixture(scope="module")
def gpt2_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    _gpt2().save_pretrained(root / "gpt2")
    return root


def test_hf_example_inputs_follow_the_config():
    kw, what = hf_example_inputs(_gpt2(), (3, 5), seed=1)
    assert list(kw) == ["input_ids", "attention_mask"]
    assert kw["input_ids"].dtype == torch.long and kw["input_ids"].shape == (3, 5)
    assert 0 <= int(kw["input_ids"].min()) and int(kw["input_ids"].max()) < 100
    assert torch.equal(kw["attention_mask"], torch.ones(3, 5, dtype=torch.long))
    assert "token ids 3x5" in what
    kw, _ = hf_example_inputs(_vit())
    assert list(kw) == ["pixel_values"] and kw["pixel_values"].shape == (2, 3, 32, 32)
    assert kw["pixel_values"].dtype == torch.float32


def test_gpt2_folder_convert_export_check(gpt2_dirs, capsys):
    src, out, onnx = gpt2_dirs / "gpt2", gpt2_dirs / "gpt2.rms", gpt2_dirs / "gpt2.onnx"
    code, stdout, err = run_cli(["convert", str(src), "--to", "rmsnorm", "--input-shape", "2,16", "-o", str(out)],
                                capsys)
    assert code == 0, stdout + err
    assert "token ids 2x16 in [0, 100) with an attention mask of ones" in stdout
    # the written folder reads back with the original's outputs, for an input the CLI never saw
    original, converted = nf.load(src), nf.load(out)
    assert any(type(m).__name__ == "RMSNorm" for m in converted.modules())
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in converted.modules())
    kw = {"input_ids": torch.randint(0, 100, (3, 11), generator=torch.Generator().manual_seed(5)),
          "attention_mask": torch.ones(3, 11, dtype=torch.long)}
    _same(_logits(converted, kw), _logits(original, kw))

    code, stdout, err = run_cli(["export", str(out), "-o", str(onnx)], capsys)
    assert code == 0, stdout + err
    sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    got = sess.run(None, {k: v.numpy() for k, v in kw.items()})[0]  # another batch and sequence length
    _same(torch.from_numpy(got), _logits(original, kw))

    code, stdout, err = run_cli(["check", str(src), "--candidate", str(out), "--input-shape", "2,8"], capsys)
    assert code == 0, stdout + err
    for stage in ("outputs[candidate]", "outputs[onnx]", "batch_independence[onnx]"):
        assert any(stage in line and "[ok" in line for line in stdout.splitlines()), (stage, stdout)
    assert "PASSED" in stdout


def test_gpt2_bad_input_shape_is_one_line(gpt2_dirs, capsys):
    code, stdout, err = run_cli(["convert", str(gpt2_dirs / "gpt2"), "--to", "rmsnorm", "--input-shape", "2,3,4",
                                 "-o", str(gpt2_dirs / "bad.rms")], capsys)
    assert code == 2 and "token ids are batch,sequence" in err and "Traceback" not in err


def test_vit_folder_convert_check(tmp_path, capsys):
    _vit().save_pretrained(tmp_path / "vit")
    src, out = tmp_path / "vit", tmp_path / "vit.rms"
    code, stdout, err = run_cli(["convert", str(src), "--to", "rmsnorm", "-o", str(out)], capsys)
    assert code == 0, stdout + err
    assert "pixel_values 2x3x32x32" in stdout
    assert (out / "model.safetensors").is_file()  # the safe format, not a pickle
    x = {"pixel_values": torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))}
    converted = nf.load(out)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in converted.modules())
    _same(_logits(converted, x), _logits(nf.load(src), x))
    code, stdout, err = run_cli(["check", str(src), "--candidate", str(out)], capsys)
    assert code == 0 and "PASSED" in stdout, stdout + err


def test_image_size_defaults_for_a_conv_net_config():
    # transformers' ResNetConfig names no image_size: the inputs are ImageNet-sized, not refused
    kw, what = hf_example_inputs(_resnet())
    assert kw["pixel_values"].shape == (2, 3, DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    assert f"pixel_values 2x3x{DEFAULT_IMAGE_SIZE}x{DEFAULT_IMAGE_SIZE}" == what


def test_gpt2_folder_fold_and_inspect(gpt2_dirs, capsys):
    src, out = gpt2_dirs / "gpt2", gpt2_dirs / "gpt2.folded"
    # --input-shape is batch,sequence of token ids, as for convert/export/check (it built a float tensor before)
    code, stdout, err = run_cli(["fold", str(src), "--input-shape", "1,16", "-o", str(out)], capsys)
    assert code == 1, stdout + err
    assert "inputs from --input-shape: token ids 1x16 in [0, 100) with an attention mask of ones" in stdout
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("FAILED: nothing to fold: the model has no BatchNorm layer (norm layers: layernorm 5; "
                           "`normfold convert --to rmsnorm` rewrites LayerNorm); nothing written"), last
    assert "--allow-noop" in last and not out.exists()

    code, stdout, err = run_cli(["inspect", str(src)], capsys)
    assert code == 0, stdout + err
    assert "token ids 2x16 in [0, 100)" in stdout
    assert stdout.strip().splitlines()[-1] == "5 normalization layer(s) (layernorm 5); 0 BatchNorm(s) can be folded"


def test_resnet_folder_fold_and_inspect(tmp_path, capsys):
    _resnet().save_pretrained(tmp_path / "resnet")
    src, out = tmp_path / "resnet", tmp_path / "resnet.folded"
    code, stdout, err = run_cli(["inspect", str(src), "--input-shape", "1,3,32,32"], capsys)
    assert code == 0, stdout + err
    assert stdout.strip().splitlines()[-1] == "6 normalization layer(s) (batchnorm 6); 6 BatchNorm(s) can be folded"

    code, stdout, err = run_cli(["fold", str(src), "-o", str(out)], capsys)
    assert code == 0, stdout + err
    assert f"pixel_values 2x3x{DEFAULT_IMAGE_SIZE}x{DEFAULT_IMAGE_SIZE}" in stdout
    assert "folded 6 BatchNorm layer(s), left 0 alone" in stdout.strip().splitlines()[-1]
    folded, original = nf.load(out), nf.load(src)
    # the model's own class and config come back (not the keyword-to-positional wrapper used while folding)
    assert type(folded) is transformers.ResNetForImageClassification
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = {"pixel_values": torch.randn(3, 3, 40, 48, generator=torch.Generator().manual_seed(3))}
    _same(_logits(folded, x), _logits(original, x))

    # --onnx: the folded model and its export take the keyword inputs positionally, checked in onnxruntime
    onnx = tmp_path / "resnet.onnx"
    code, stdout, err = run_cli(["fold", str(src), "--input-shape", "2,3,32,32", "--onnx", str(onnx),
                                 "-o", str(tmp_path / "resnet.folded2")], capsys)
    assert code == 0, stdout + err
    assert stdout.strip().splitlines()[-1].startswith("PASSED"), stdout
    sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["pixel_values"]
    x = {"pixel_values": x["pixel_values"][..., :32, :32].contiguous()}  # the batch is dynamic, the image size not
    got = sess.run(None, {"pixel_values": x["pixel_values"].numpy()})[0]
    _same(torch.from_numpy(got), _logits(original, x))
