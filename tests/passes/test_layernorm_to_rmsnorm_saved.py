"""The centring op is a module: a converted Whisper (GELU conv stem) saves in normfold's safe format and reads back."""

from __future__ import annotations

import pytest
import torch

import normfold as nf
from normfold.io import load_model, save_model
from normfold.passes.layernorm_to_rmsnorm import CentredInput, CentredOutput, layernorm_to_rmsnorm
from normfold.verify import compare

transformers = pytest.importorskip("transformers")


def test_whisper_with_a_centring_op_round_trips_through_a_safe_folder(tmp_path) -> None:
    torch.manual_seed(0)
    config = transformers.WhisperConfig(vocab_size=100, num_mel_bins=8, d_model=32, encoder_layers=2, decoder_layers=2,
                                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                        decoder_ffn_dim=64, max_source_positions=16, max_target_positions=32,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    model = transformers.WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # LayerNorms with non-trivial scales and shifts, so that a lost shift would show
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
    model.save_pretrained(tmp_path / "whisper")
    loaded = load_model(tmp_path / "whisper")
    g = torch.Generator().manual_seed(3)
    kw = {"input_features": torch.randn(2, 8, 32, generator=g),
          "decoder_input_ids": torch.randint(0, 100, (2, 5), generator=g)}
    r = layernorm_to_rmsnorm(loaded.module, mode="exact", example_inputs=kw)
    ops = [c for c in r.changes if c.action == "centre_op"]
    wrappers = [p for p, m in r.module.named_modules() if isinstance(m, (CentredInput, CentredOutput))]
    assert ops and sorted(wrappers) == sorted(c.paths[0] for c in ops)  # every centring op is a wrapper module
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in r.module.modules())

    out = save_model(r.module, tmp_path / "whisper.rms", source=loaded)  # safe format: weights + recipe
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.pt"))
    back = nf.load(out)
    assert [p for p, m in back.named_modules() if isinstance(m, (CentredInput, CentredOutput))] == wrappers

    kw2 = {"input_features": torch.randn(3, 8, 32, generator=g),
           "decoder_input_ids": torch.randint(0, 100, (3, 7), generator=g)}
    with torch.no_grad():
        want = model(**kw2).logits
        got_converted = r.module.eval()(**kw2).logits
        got_back = back.eval()(**kw2).logits
    assert torch.equal(got_back, got_converted)  # bitwise: the file holds the converted model exactly
    v = compare(want, got_back)  # which is the original model, by normfold.verify's rule (the policy)
    assert v.passed, v.describe()
