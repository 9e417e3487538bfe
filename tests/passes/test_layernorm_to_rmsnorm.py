"""layernorm_to_rmsnorm: exact on pre-LN transformers (torchvision ViT, a GPT with a tied LM head), approx elsewhere.

Every test compares the converted model's outputs with the original's. Random
weights: LayerNorm scales and shifts and the classifier heads (which
torchvision initialises to 1 / 0 / 0) are randomized so that a dropped shift,
a wrong eps or a zero head cannot pass.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from tests.conftest import assert_state_equal, output_error, run_eval, state_snapshot
from normfold import RMSNormWithBias, layernorm_to_rmsnorm
from normfold.errors import UsageError
from normfold.tolerances import MEAN_FREE_RATIO, POLICY
from normfold.verify import compare



def assert_same(actual: object, reference: object, *, what: str) -> None:
    """An exact swap computes the original's outputs: normfold.verify's verdict (the policy), as `convert` judges it."""
    v = compare(reference, actual)
    assert v.passed, f"{what}: {v.describe()}"


def assert_centred(weight: torch.Tensor, dim: int) -> None:
    """``weight`` is mean-free along ``dim`` by the rule the pass checks its LayerNorm inputs with (MEAN_FREE_RATIO)."""
    w = weight.detach().double()
    assert (w.mean(dim=dim).abs().max() / w.pow(2).mean().sqrt()).item() < MEAN_FREE_RATIO[weight.dtype]


@torch.no_grad()
def randomize_layernorms_and_heads(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial LayerNorm scale/shift, and random weights for any all-zero parameter (torchvision's heads)."""
    g = torch.Generator().manual_seed(seed)
    for _, m in model.named_modules():
        if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
            if m.bias is not None:
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    for _, p in model.named_parameters():
        if torch.count_nonzero(p) == 0:
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def layernorms(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]


def small_vit() -> nn.Module:
    torch.manual_seed(0)
    m = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=32,
                                             mlp_dim=64, num_classes=10)
    return randomize_layernorms_and_heads(m).eval()


def image(batch: int = 2, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, size, size, generator=g) * 2 + 0.5


# ----------------------------------------------------------------------------------------------
# hand-written language models


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.q, self.k, self.v, self.proj = (nn.Linear(d, d) for _ in range(4))
        self.heads, self.causal = heads, causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        split = lambda y: y.view(b, t, self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class PreLNBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-5), nn.LayerNorm(d, eps=1e-5)
        self.attn = SelfAttention(d, heads, causal=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class TinyGPT(nn.Module):
    """Pre-LN GPT: token + position embeddings, final LayerNorm, LM head tied to the token embedding."""

    def __init__(self, vocab: int = 50, ctx: int = 16, d: int = 32, heads: int = 4, layers: int = 2,
                 final_norm: bool = True) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.Sequential(*(PreLNBlock(d, heads) for _ in range(layers)))
        self.ln_f = nn.LayerNorm(d) if final_norm else nn.Identity()
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.tok.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        return self.lm_head(self.ln_f(self.blocks(x)))


class PostLNBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.attn = SelfAttention(d, heads, causal=False)
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-12), nn.LayerNorm(d, eps=1e-12)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.mlp(x))


class TinyBERT(nn.Module):
    """Post-LN encoder (BERT): embeddings -> LayerNorm, each block normalizes after its residual add."""

    def __init__(self, vocab: int = 50, ctx: int = 16, d: int = 32, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.word, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.emb_ln = nn.LayerNorm(d, eps=1e-12)
        self.blocks = nn.Sequential(*(PostLNBlock(d, heads) for _ in range(layers)))
        self.pooler = nn.Linear(d, d)
        self.classifier = nn.Linear(d, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.blocks(self.emb_ln(self.word(idx) + self.pos(pos)))
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


def tokens(batch: int = 2, length: int = 16, vocab: int = 50) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(2))


def conversions(result) -> dict[str, str]:
    return {c.paths[0]: c.details["conversion"] for c in result.changes if c.action == "to_rmsnorm"}


# ----------------------------------------------------------------------------------------------
# exact


@pytest.mark.parametrize("mode", ["exact", "auto"])
def test_small_vit_is_converted_exactly(mode: str) -> None:
    model, x = small_vit(), image()
    model.train()
    model.encoder.layers[0].eval()  # a mix of flags, to see they come back as given
    flags = {n: m.training for n, m in model.named_modules()}
    snap = state_snapshot(model)
    before = run_eval(model, (x,))

    r = layernorm_to_rmsnorm(model, mode=mode, example_inputs=x)

    assert_state_equal(model, snap)  # inplace=False: the caller's model is untouched
    assert all(isinstance(m, nn.LayerNorm) for n, m in model.named_modules() if n in layernorms(small_vit()))
    out = r.module
    assert not layernorms(out) and not r.skipped
    assert set(conversions(r).values()) == {"exact"} and len(conversions(r)) == 7
    assert {n: m.training for n, m in out.named_modules() if n in flags} == flags
    assert_same(run_eval(out, (x,)), before, what=f"ViT {mode}")
    # eps reused, scale kept, shift either kept or folded into the following Linear
    for path, c in ((c.paths[0], c) for c in r.changes if c.action == "to_rmsnorm"):
        new, old = out.get_submodule(path), model.get_submodule(path)
        assert isinstance(new, nn.RMSNorm) and new.eps == old.eps
        assert torch.equal(new.weight, old.weight)
        assert isinstance(new, RMSNormWithBias) == (c.details["bias_folded_into"] is None)
    folded = {c.paths[0]: c.details["bias_folded_into"] for c in r.changes if c.action == "to_rmsnorm"}
    assert folded["encoder.ln"] == "heads.head" and folded["encoder.layers.encoder_layer_0.ln_2"].endswith("mlp.0")
    # self-attention reads ln_1 as query, key and value: the shift goes into its packed in_proj_bias
    assert folded["encoder.layers.encoder_layer_0.ln_1"] == "encoder.layers.encoder_layer_0.self_attention"
    centred = {path for c in r.changes if c.action == "centre" for path in c.paths}
    assert {"conv_proj.weight", "conv_proj.bias", "encoder.pos_embedding", "class_token"} <= centred
    assert r.metrics["exact_verified"] is True and r.metrics["output_within_tolerance"] is True
    assert r.metrics["output_max_abs_error"] == pytest.approx(output_error(run_eval(out, (x,)), before)[0])
    for v in r.metrics["layers"].values():
        assert v["input_mean_over_rms"] < MEAN_FREE_RATIO[torch.float32]


def test_real_vit_b_16_is_converted_exactly() -> None:
    torch.manual_seed(0)
    model = randomize_layernorms_and_heads(torchvision.models.vit_b_16(num_classes=10)).eval()
    x = image(1, 224)
    before = run_eval(model, (x,))
    r = layernorm_to_rmsnorm(model, mode="exact", example_inputs=x, inplace=True)
    assert r.module is model
    assert not r.skipped and not layernorms(model)
    assert len(conversions(r)) == 25 and set(conversions(r).values()) == {"exact"}
    # 12 attention out_proj + 12 MLP output linears + patch conv + position embedding + class token
    assert sum(c.action == "centre" for c in r.changes) == 27
    assert_same(run_eval(model, (x,)), before, what="vit_b_16 exact")
    assert r.metrics["graph_source"] == "fx" and r.metrics["exact_verified"] is True


def test_gpt_with_tied_head_is_exact_and_untied() -> None:
    torch.manual_seed(0)
    model = randomize_layernorms_and_heads(TinyGPT()).eval()
    idx = tokens()
    before = run_eval(model, (idx,))
    snap = state_snapshot(model)

    r = layernorm_to_rmsnorm(model, mode="exact", example_inputs=idx)

    assert_state_equal(model, snap)
    assert model.lm_head.weight is model.tok.weight  # the caller's tie is untouched
    out = r.module
    assert not r.skipped and set(conversions(r).values()) == {"exact"} and len(conversions(r)) == 5
    unties = [c for c in r.changes if c.action == "untie"]
    assert len(unties) == 1 and unties[0].paths == ("lm_head.weight", "tok.weight")
    assert out.lm_head.weight is not out.tok.weight
    assert torch.equal(out.lm_head.weight, model.tok.weight)  # the head keeps the original values
    assert_centred(out.tok.weight, dim=1)
    assert_same(run_eval(out, (idx,)), before, what="TinyGPT exact")
    # without the untie the head would read the centred embedding: the outputs would differ
    broken = copy.deepcopy(out)
    broken.lm_head.weight = broken.tok.weight
    assert not compare(before, run_eval(broken, (idx,))).passed


# ----------------------------------------------------------------------------------------------
# refused / approximate


def test_post_ln_bert_is_approx_in_auto_and_refused_in_exact() -> None:
    torch.manual_seed(0)
    model = randomize_layernorms_and_heads(TinyBERT()).eval()
    idx = tokens()
    before = run_eval(model, (idx,))
    block_lns = [n for n in layernorms(model) if n.startswith("blocks.")]

    auto = layernorm_to_rmsnorm(model, mode="auto", example_inputs=idx)
    conv = conversions(auto)
    # the embedding sum is read only by emb_ln: that one is exact; every post-LN block is not
    assert conv == {"emb_ln": "exact", **{n: "approx" for n in block_lns}}
    why = {c.paths[0]: c.details["reason"] for c in auto.changes if c.action == "to_rmsnorm"}
    assert "post-LN" in why["blocks.0.ln1"] and "emb_ln" in why["blocks.0.ln1"]
    assert "blocks.0.attn.q (Linear)" in why["blocks.0.ln1"]  # the consumer that reads the stream
    assert "approx" in next(c.message for c in auto.changes if c.paths[0] == "blocks.0.ln1")
    err = output_error(run_eval(auto.module, (idx,)), before)
    assert auto.metrics["output_max_abs_error"] == pytest.approx(err[0]) and err[0] > 0
    assert set(auto.metrics["layers"]) == set(layernorms(model))

    exact = layernorm_to_rmsnorm(model, mode="exact", example_inputs=idx)
    assert conversions(exact) == {"emb_ln": "exact"}
    assert sorted(s.paths[0] for s in exact.skipped) == sorted(block_lns)
    assert all("post-LN" in s.reason for s in exact.skipped)
    assert_same(run_eval(exact.module, (idx,)), before, what="TinyBERT exact (refused blocks)")


def test_head_reading_the_stream_without_layernorm_is_refused() -> None:
    torch.manual_seed(0)
    model = randomize_layernorms_and_heads(TinyGPT(final_norm=False)).eval()
    idx = tokens()
    r = layernorm_to_rmsnorm(model, mode="exact", example_inputs=idx)
    assert not any(c.action in ("to_rmsnorm", "centre") for c in r.changes)
    assert len(r.skipped) == 4 and all("lm_head (Linear)" in s.reason for s in r.skipped)
    assert_same(run_eval(r.module, (idx,)), run_eval(model, (idx,)), what="refused")


class Gated(nn.Module):
    """The stream is multiplied by a per-feature gate: does not commute with centring."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(8, d), nn.Linear(d, 4)
        self.gate = nn.Parameter(torch.rand(d) + 0.5)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(self.ln2(h * self.gate + self.ln1(h)))


def test_gate_on_the_stream_is_refused_with_the_op_named() -> None:
    torch.manual_seed(0)
    model = randomize_layernorms_and_heads(Gated()).eval()
    x = torch.randn(3, 8)
    r = layernorm_to_rmsnorm(model, mode="auto", example_inputs=x)
    why = {c.paths[0]: c.details["reason"] for c in r.changes if c.action == "to_rmsnorm"}
    assert set(conversions(r).values()) == {"approx"}
    assert "mul" in why["ln2"] and "mul" in why["ln1"]  # ln1 reads h, which the gate also reads


def test_approx_reports_the_error_it_makes() -> None:
    model, x = small_vit(), image()
    before = run_eval(model, (x,))
    r = layernorm_to_rmsnorm(model, mode="approx", example_inputs=x, fold_bias=False)
    assert set(conversions(r).values()) == {"approx"}
    assert not any(c.action == "centre" for c in r.changes)
    assert all(isinstance(r.module.get_submodule(p), RMSNormWithBias) for p in conversions(r))
    assert all("exact would be possible" in c.details["reason"] for c in r.changes if c.action == "to_rmsnorm")
    abs_err, rel_err = output_error(run_eval(r.module, (x,)), before)
    assert r.metrics["output_max_abs_error"] == pytest.approx(abs_err)
    assert r.metrics["output_rel_error"] == pytest.approx(rel_err)
    assert abs_err > 1e-2  # uncentred inputs: RMSNorm is not LayerNorm
    layer = r.metrics["layers"]["encoder.layers.encoder_layer_0.ln_1"]
    assert layer["max_abs_error"] > 0 and layer["input_mean_over_rms"] > 1e-2
    # The first LayerNorm's input is the same in both models: its error is exactly LN(x) - RMSNorm(x) - b.
    ln = model.encoder.layers[0].ln_1
    seen = {}
    h = ln.register_forward_hook(lambda m, a, o: seen.setdefault("x", a[0]))
    run_eval(model, (x,))
    h.remove()
    rms = nn.RMSNorm(32, eps=ln.eps)
    with torch.no_grad():
        rms.weight.copy_(ln.weight)
        expect = (ln(seen["x"]) - rms(seen["x"]) - ln.bias).abs().max().item()
    assert layer["max_abs_error"] == pytest.approx(expect, rel=1e-3)


def test_fold_bias_off_is_still_exact_and_bad_mode_is_a_usage_error() -> None:
    model, x = small_vit(), image()
    r = layernorm_to_rmsnorm(model, mode="exact", example_inputs=x, fold_bias=False)
    assert all(isinstance(r.module.get_submodule(p), RMSNormWithBias) for p in conversions(r))
    assert_same(run_eval(r.module, (x,)), run_eval(model, (x,)), what="exact, shifts kept")
    with pytest.raises(UsageError, match="mode must be one of"):
        layernorm_to_rmsnorm(model, mode="exactly")


class ExportOnlyGPT(TinyGPT):
    """torch.fx cannot trace ``int(idx.shape[1])``: the analysis runs on the torch.export (ATen) graph instead."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        if not tied:
            self.lm_head.weight = nn.Parameter(self.tok.weight.detach().clone() + 0.1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(int(idx.shape[1]), device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        return self.lm_head(self.ln_f(self.blocks(x)))


def test_export_graph_exact_and_tied_head_untied_there_too() -> None:
    torch.manual_seed(0)
    idx = tokens()
    model = randomize_layernorms_and_heads(ExportOnlyGPT(tied=False)).eval()
    r = layernorm_to_rmsnorm(model, mode="exact", example_inputs=idx)
    assert r.metrics["graph_source"] == "export"
    assert not r.skipped and set(conversions(r).values()) == {"exact"} and len(conversions(r)) == 5
    assert_same(run_eval(r.module, (idx,)), run_eval(model, (idx,)), what="export-traced GPT exact")

    # torch.export keeps one placeholder for a tied tensor, named after whichever holder comes first: the
    # holder the stream reads is found from the module the reading op runs in, in either order.
    for head_first in (False, True):
        tied = randomize_layernorms_and_heads(ExportOnlyGPT(tied=True)).eval()
        if head_first:
            tied._modules = {"lm_head": tied._modules["lm_head"],
                             **{k: v for k, v in tied._modules.items() if k != "lm_head"}}
            assert next(n for n, _ in tied.named_parameters()) == "lm_head.weight"
        r = layernorm_to_rmsnorm(tied, mode="exact", example_inputs=idx)
        assert r.metrics["graph_source"] == "export" and not r.skipped
        assert set(conversions(r).values()) == {"exact"} and len(conversions(r)) == 5
        unties = [c for c in r.changes if c.action == "untie"]
        assert len(unties) == 1 and unties[0].paths == ("lm_head.weight", "tok.weight"), head_first
        assert torch.equal(r.module.lm_head.weight, tied.tok.weight)  # the head keeps the original values
        assert tied.lm_head.weight is tied.tok.weight
        assert_same(run_eval(r.module, (idx,)), run_eval(tied, (idx,)), what="export-traced tied GPT")


class CrossAttention(nn.Module):
    """The LayerNorm output is only the query of a MultiheadAttention: its shift cannot go into in_proj_bias."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.inp, self.mem = nn.Linear(8, d), nn.Linear(8, d)
        self.ln, self.ln_f = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.out = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        m = self.mem(memory)
        h = h + self.attn(self.ln(h), m, m, need_weights=False)[0]
        return self.out(self.ln_f(h))


def test_cross_attention_keeps_the_shift_in_the_norm() -> None:
    torch.manual_seed(0)
    model = randomize_layernorms_and_heads(CrossAttention()).eval()
    inputs = (torch.randn(2, 5, 8), torch.randn(2, 7, 8))
    r = layernorm_to_rmsnorm(model, mode="exact", example_inputs=inputs)
    assert conversions(r) == {"ln": "exact", "ln_f": "exact"}
    assert isinstance(r.module.ln, RMSNormWithBias) and type(r.module.ln_f) is nn.RMSNorm
    assert {p for c in r.changes if c.action == "centre" for p in c.paths} == {
        "inp.weight", "inp.bias", "attn.out_proj.weight", "attn.out_proj.bias"}  # not mem: it is no stream
    assert_same(run_eval(r.module, inputs), run_eval(model, inputs), what="cross-attention exact")


# ----------------------------------------------------------------------------------------------
# writers recognised by what they compute; LayerScale; one centring op


class Conv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D: ``addmm(b, x, W)`` with an (in, out) weight."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(0.1 * torch.randn(nx, nf))
        self.bias = nn.Parameter(0.1 * torch.randn(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class MatmulLinear(nn.Linear):
    """Falcon's FalconLinear: its own forward, which computes x W^T + b."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class ScaledLinear(nn.Linear):
    """A Linear subclass whose forward is *not* x W^T + b."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) * 2.0


class OddWriters(nn.Module):
    def __init__(self, mlp_out: type[nn.Linear] = MatmulLinear, d: int = 16, layerscale: bool = False) -> None:
        super().__init__()
        self.tok = nn.Embedding(30, d)
        self.ln1, self.ln2, self.ln_f = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn_out = Conv1D(d, d)
        self.fc, self.fc_out = nn.Linear(d, 2 * d), mlp_out(2 * d, d)
        self.head = nn.Linear(d, 5)
        self.gamma = nn.Parameter(torch.rand(d) + 0.5) if layerscale else None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx).to(torch.float64).to(torch.float32)  # dtype casts of the stream
        x = x + self.attn_out(self.ln1(x))
        mlp = self.fc_out(F.gelu(self.fc(self.ln2(x))))
        x = x + (self.gamma * mlp if self.gamma is not None else mlp)
        return self.head(self.ln_f(x))


def test_writers_are_recognised_by_what_they_compute() -> None:
    torch.manual_seed(0)
    idx = tokens(vocab=30)
    model = randomize_layernorms_and_heads(OddWriters()).eval()
    r = layernorm_to_rmsnorm(model, mode="exact", example_inputs=idx)
    assert not r.skipped and set(conversions(r).values()) == {"exact"} and len(conversions(r)) == 3
    centred = {p for c in r.changes if c.action == "centre" for p in c.paths}
    assert {"attn_out.weight", "attn_out.bias", "fc_out.weight", "fc_out.bias", "tok.weight"} <= centred
    assert_centred(r.module.attn_out.weight, dim=1)  # (in, out) weight: centred along its output axis, dim 1
    # ln1's shift goes into the Conv1D's bias through its view + addmm: (y + b) W + c = y W + (b W + c)
    assert type(r.module.ln1) is nn.RMSNorm
    assert next(c for c in r.changes if c.paths[0] == "ln1").details["bias_folded_into"] == "attn_out"
    assert_same(run_eval(r.module, (idx,)), run_eval(model, (idx,)), what="Conv1D + FalconLinear")

    other = randomize_layernorms_and_heads(OddWriters(mlp_out=ScaledLinear)).eval()
    r = layernorm_to_rmsnorm(other, mode="auto", example_inputs=idx)
    why = {c.paths[0]: c.details["reason"] for c in r.changes if c.action == "to_rmsnorm"}
    assert set(conversions(r).values()) == {"approx"}
    assert all("fc_out: ScaledLinear overrides forward()" in w for w in why.values())


def test_layerscale_is_folded_into_its_writer() -> None:
    torch.manual_seed(0)
    idx = tokens(vocab=30)
    model = randomize_layernorms_and_heads(OddWriters(layerscale=True)).eval()
    r = layernorm_to_rmsnorm(model, mode="exact", example_inputs=idx)
    assert not r.skipped and set(conversions(r).values()) == {"exact"}
    folds = [c for c in r.changes if c.action == "fold_scale"]
    assert len(folds) == 1 and folds[0].paths == ("gamma", "fc_out")
    assert torch.equal(r.module.gamma, torch.ones(16)) and not torch.equal(model.gamma, torch.ones(16))
    assert_same(run_eval(r.module, (idx,)), run_eval(model, (idx,)), what="LayerScale folded")


class GeluStem(nn.Module):
    """The stream starts at a GELU (a module, or a functional call at the top level): no weight can centre it."""

    def __init__(self, functional: bool, layers: int = 2, d: int = 32) -> None:
        super().__init__()
        self.stem, self.act = nn.Linear(12, d), nn.GELU()
        self.functional = functional
        self.pos = nn.Parameter(0.1 * torch.randn(6, d))
        self.blocks = nn.Sequential(*(PreLNBlock(d, 4) for _ in range(layers)))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.stem(x)) if self.functional else self.act(self.stem(x))
        return self.head(self.ln_f(self.blocks(h + self.pos)))


@pytest.mark.parametrize("functional", [False, True])
def test_one_centring_op_where_the_stream_starts_at_a_nonlinear_map(functional: bool) -> None:
    torch.manual_seed(0)
    model = randomize_layernorms_and_heads(GeluStem(functional)).eval()
    x = torch.randn(2, 6, 12)
    r = layernorm_to_rmsnorm(model, mode="exact", example_inputs=x)
    assert not r.skipped and set(conversions(r).values()) == {"exact"} and len(conversions(r)) == 5
    ops = [c for c in r.changes if c.action == "centre_op"]
    assert len(ops) == 1 and ops[0].details["layernorms_made_exact"] == 5 and ops[0].details["flops_per_token"] == 64
    if functional:  # the blocks, where the stream enters them, wrapped in CentredInput
        assert ops[0].details["kind"] == "input" and ops[0].paths == ("blocks",)
        assert type(r.module.blocks).__name__ == "CentredInput" and r.module.blocks.module is not model.blocks
    else:  # the GELU module wrapped in CentredOutput
        assert ops[0].details["kind"] == "output" and ops[0].paths == ("act",)
        assert type(r.module.act).__name__ == "CentredOutput"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in r.module.modules())  # structure, no hooks
    assert type(model.act) is nn.GELU and type(model.blocks) is nn.Sequential  # the caller's model is untouched
    assert_same(run_eval(r.module, (x,)), run_eval(model, (x,)), what="centring op")
    assert_same(run_eval(copy.deepcopy(r.module), (x,)), run_eval(model, (x,)), what="deep copy")


def test_a_centring_op_for_one_layernorm_is_not_worth_it() -> None:
    torch.manual_seed(0)
    model = randomize_layernorms_and_heads(GeluStem(False, layers=0)).eval()
    x = torch.randn(2, 6, 12)
    r = layernorm_to_rmsnorm(model, mode="auto", example_inputs=x)
    assert conversions(r) == {"ln_f": "approx"} and not any(c.action == "centre_op" for c in r.changes)
    why = next(c.details["reason"] for c in r.changes if c.action == "to_rmsnorm")
    assert "act (GELU)" in why and "saves no more than it costs" in why


def test_hf_traceable_restores_class_and_cache_even_on_error() -> None:
    pytest.importorskip("transformers")
    from normfold import hf
    from tests.zoo.hf_families import FAMILIES

    model, inputs = FAMILIES["gpt2"]()
    cls = type(model)
    assert model.config.use_cache is True
    with pytest.raises(RuntimeError, match="boom"):
        with hf.traceable(model, inputs) as positional:
            assert model.config.use_cache is False and type(model) is not cls
            out = run_eval(model, positional)
            assert isinstance(out, tuple) and len(out) == 1 and out[0].shape == (2, 7, 100)  # logits, no cache
            raise RuntimeError("boom")
    assert type(model) is cls and model.config.use_cache is True
    assert hf.flatten_output({"a": torch.ones(1), "b": None, "c": (torch.zeros(2), 3)})[1].shape == (2,)


def test_bfloat16_model_is_exact_within_the_bfloat16_policy() -> None:
    torch.manual_seed(0)
    model = randomize_layernorms_and_heads(TinyGPT()).eval().to(torch.bfloat16)
    idx = tokens()
    r = layernorm_to_rmsnorm(model, mode="exact", example_inputs=idx)
    assert set(conversions(r).values()) == {"exact"} and r.module.ln_f.weight.dtype == torch.bfloat16
    assert r.metrics["exact_verified"] is True and r.metrics["output_within_tolerance"] is True
    assert 0 < r.metrics["output_max_abs_error"]  # bfloat16 rounding of the centred weights shows


class EmbeddingLayerNormGPT(TinyGPT):
    """BLOOM-like: the stream starts at a LayerNorm of the embeddings (its output is the residual stream)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb_ln = nn.LayerNorm(32)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.lm_head(self.ln_f(self.blocks(self.emb_ln(self.tok(idx) + self.pos(pos)))))


def test_stream_starting_at_a_layernorm_gets_the_centring_op_inside_the_converted_norm() -> None:
    from normfold.passes.layernorm_to_rmsnorm import CentredRMSNorm

    torch.manual_seed(0)
    model = randomize_layernorms_and_heads(EmbeddingLayerNormGPT()).eval()
    idx = tokens()
    r = layernorm_to_rmsnorm(model, mode="exact", example_inputs=idx)
    assert not r.skipped and set(conversions(r).values()) == {"exact"} and len(conversions(r)) == 6
    ops = [c for c in r.changes if c.action == "centre_op"]
    assert len(ops) == 1 and ops[0].paths == ("emb_ln",) and ops[0].details["layernorms_made_exact"] == 5
    assert type(r.module.emb_ln) is CentredRMSNorm and r.metrics["centring_ops"] == 1
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in r.module.modules())  # structure, no hooks
    # emb_ln's own error is measured against its centred original output: rounding only, within the policy
    assert r.metrics["layers"]["emb_ln"]["rel_error"] <= POLICY[torch.float32].scaled
    assert_same(run_eval(r.module, (idx,)), run_eval(model, (idx,)), what="embedding LayerNorm")
