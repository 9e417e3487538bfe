"""Tiny-config Hugging Face ``transformers`` models, one per LayerNorm family, for the RMSNorm coverage test.

Every builder returns ``(model, example_inputs)``: random weights perturbed by
0.02 * N(0, 1) (so that LayerNorm scales and shifts, zero-initialised biases and
tied heads are all non-trivial), default config otherwise (``use_cache`` left
at its default), inputs as keyword tensors the way a user calls the model.
Nothing is downloaded.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

H, LAYERS, HEADS, VOCAB, SEQ, BATCH = 32, 2, 4, 100, 7, 2


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    for m in model.modules():
        if isinstance(m, nn.LayerNorm) and m.weight is not None:
            m.weight.add_(0.2 * torch.randn(m.weight.shape, generator=g))
    return model.eval()


def _tokens(seed: int = 1, vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, :2] = 0  # a padded row: attention masks are part of the input
    return {"input_ids": ids, "attention_mask": mask}


def _pixels(size: int = 32, channels: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {"pixel_values": torch.randn(BATCH, channels, size, size, generator=g)}


def _lm(config_cls: str, model_cls: str, **cfg: Any) -> Callable[[], tuple[nn.Module, dict]]:
    def build() -> tuple[nn.Module, dict]:
        import transformers

        torch.manual_seed(0)
        config = getattr(transformers, config_cls)(**cfg)
        model = getattr(transformers, model_cls)(config)
        return perturb(model), _tokens()
    return build


def _vision(config_cls: str, model_cls: str, size: int = 32, **cfg: Any) -> Callable[[], tuple[nn.Module, dict]]:
    def build() -> tuple[nn.Module, dict]:
        import transformers

        torch.manual_seed(0)
        config = getattr(transformers, config_cls)(**cfg)
        model = getattr(transformers, model_cls)(config)
        return perturb(model), _pixels(size)
    return build


def _whisper(part: str) -> Callable[[], tuple[nn.Module, dict]]:
    def build() -> tuple[nn.Module, dict]:
        import transformers

        torch.manual_seed(0)
        config = transformers.WhisperConfig(vocab_size=VOCAB, num_mel_bins=8, d_model=H, encoder_layers=LAYERS,
                                            decoder_layers=LAYERS, encoder_attention_heads=HEADS,
                                            decoder_attention_heads=HEADS, encoder_ffn_dim=2 * H,
                                            decoder_ffn_dim=2 * H, max_source_positions=16,
                                            max_target_positions=32, pad_token_id=0, bos_token_id=1,
                                            eos_token_id=2, decoder_start_token_id=1)
        g = torch.Generator().manual_seed(3)
        feats = torch.randn(BATCH, 8, 32, generator=g)
        if part == "encoder":
            model = transformers.WhisperModel(config).get_encoder()
            return perturb(model), {"input_features": feats}
        model = transformers.WhisperForConditionalGeneration(config)
        return perturb(model), {"input_features": feats, "decoder_input_ids": _tokens()["input_ids"]}
    return build


LM = dict(vocab_size=VOCAB)
#: family -> builder. Pre-LN families first, then post-LN ones (approximate by design).
FAMILIES: dict[str, Callable[[], tuple[nn.Module, dict]]] = {
    "gpt2": _lm("GPT2Config", "GPT2LMHeadModel", n_embd=H, n_layer=LAYERS, n_head=HEADS, n_positions=32, **LM),
    "opt": _lm("OPTConfig", "OPTForCausalLM", hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
               ffn_dim=2 * H, max_position_embeddings=32, word_embed_proj_dim=H, **LM),
    "bloom": _lm("BloomConfig", "BloomForCausalLM", hidden_size=H, n_layer=LAYERS, n_head=HEADS, **LM),
    "falcon": _lm("FalconConfig", "FalconForCausalLM", hidden_size=H, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, **LM),
    "gpt_neox": _lm("GPTNeoXConfig", "GPTNeoXForCausalLM", hidden_size=H, num_hidden_layers=LAYERS,
                    num_attention_heads=HEADS, intermediate_size=2 * H, max_position_embeddings=32, **LM),
    "gptj": _lm("GPTJConfig", "GPTJForCausalLM", n_embd=H, n_layer=LAYERS, n_head=HEADS, rotary_dim=4,
                n_positions=32, **LM),
    "phi": _lm("PhiConfig", "PhiForCausalLM", hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
               intermediate_size=2 * H, max_position_embeddings=32, **LM),
    "vit": _vision("ViTConfig", "ViTForImageClassification", hidden_size=H, num_hidden_layers=LAYERS,
                   num_attention_heads=HEADS, intermediate_size=2 * H, image_size=32, patch_size=8, num_labels=5),
    "whisper_encoder": _whisper("encoder"),
    "whisper": _whisper("full"),
    "clip_text": _lm("CLIPTextConfig", "CLIPTextModel", hidden_size=H, num_hidden_layers=LAYERS,
                     num_attention_heads=HEADS, intermediate_size=2 * H, max_position_embeddings=32, **LM),
    "clip_vision": _vision("CLIPVisionConfig", "CLIPVisionModel", hidden_size=H, num_hidden_layers=LAYERS,
                           num_attention_heads=HEADS, intermediate_size=2 * H, image_size=32, patch_size=8),
    "biogpt": _lm("BioGptConfig", "BioGptForCausalLM", hidden_size=H, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, intermediate_size=2 * H, max_position_embeddings=32, **LM),
    "codegen": _lm("CodeGenConfig", "CodeGenForCausalLM", n_embd=H, n_layer=LAYERS, n_head=HEADS, rotary_dim=4,
                   n_positions=32, n_ctx=32, **LM),
    "gpt_neo": _lm("GPTNeoConfig", "GPTNeoForCausalLM", hidden_size=H, num_layers=LAYERS, num_heads=HEADS,
                   attention_types=[[["global", "local"], 1]], max_position_embeddings=32, window_size=4, **LM),
    "xglm": _lm("XGLMConfig", "XGLMForCausalLM", d_model=H, num_layers=LAYERS, attention_heads=HEADS, ffn_dim=2 * H,
                max_position_embeddings=32, **LM),
    "mpt": _lm("MptConfig", "MptForCausalLM", d_model=H, n_layers=LAYERS, n_heads=HEADS, max_seq_len=32, **LM),
    "stablelm": _lm("StableLmConfig", "StableLmForCausalLM", hidden_size=H, num_hidden_layers=LAYERS,
                    num_attention_heads=HEADS, num_key_value_heads=HEADS, intermediate_size=2 * H,
                    max_position_embeddings=32, **LM),
    "persimmon": _lm("PersimmonConfig", "PersimmonForCausalLM", hidden_size=H, num_hidden_layers=LAYERS,
                     num_attention_heads=HEADS, intermediate_size=2 * H, max_position_embeddings=32, **LM),
    "gpt_bigcode": _lm("GPTBigCodeConfig", "GPTBigCodeForCausalLM", n_embd=H, n_layer=LAYERS, n_head=HEADS,
                       n_positions=32, **LM),
    "siglip_vision": _vision("SiglipVisionConfig", "SiglipVisionModel", hidden_size=H, num_hidden_layers=LAYERS,
                             num_attention_heads=HEADS, intermediate_size=2 * H, image_size=32, patch_size=8),
    "beit": _vision("BeitConfig", "BeitForImageClassification", hidden_size=H, num_hidden_layers=LAYERS,
                    num_attention_heads=HEADS, intermediate_size=2 * H, image_size=32, patch_size=8, num_labels=5,
                    layer_scale_init_value=0.1, use_mean_pooling=False),
    "dinov2": _vision("Dinov2Config", "Dinov2Model", hidden_size=H, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, image_size=32, patch_size=8, layerscale_value=0.5),
    "bert": _lm("BertConfig", "BertModel", hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=2 * H, max_position_embeddings=32, **LM),
    "roberta": _lm("RobertaConfig", "RobertaModel", hidden_size=H, num_hidden_layers=LAYERS,
                   num_attention_heads=HEADS, intermediate_size=2 * H, max_position_embeddings=40,
                   pad_token_id=1, **LM),
}

#: families whose LayerNorms are post-LN: approximate by design
POST_LN = {"bert", "roberta"}
