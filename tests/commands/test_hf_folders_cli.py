"""Hugging Face save_pretrained folders through the CLI: convert --to rmsnorm, export, check (issues 12, 13).

The models are tiny GPT-2 (token ids + attention mask as keyword inputs) and ViT (pixel_values) built from
small configs with random weights; every output is compared with the original's.
"""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch

import normfold as nf
from normfold.inputs import hf_example_inputs

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


def _logits(model: torch.nn.Module, kw: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**kw).logits


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
    torch.testing.assert_close(_logits(converted, kw), _logits(original, kw), atol=1e-5, rtol=1e-4)

    code, stdout, err = run_cli(["export", str(out), "-o", str(onnx)], capsys)
    assert code == 0, stdout + err
    sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    got = sess.run(None, {k: v.numpy() for k, v in kw.items()})[0]  # another batch and sequence length
    torch.testing.assert_close(torch.from_numpy(got), _logits(original, kw), atol=1e-5, rtol=1e-4)

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
    torch.testing.assert_close(_logits(converted, x), _logits(nf.load(src), x), atol=1e-5, rtol=1e-4)
    code, stdout, err = run_cli(["check", str(src), "--candidate", str(out)], capsys)
    assert code == 0 and "PASSED" in stdout, stdout + err
