"""fold_weight_norm: both styles (hooks and parametrizations), both norms, bit-identical eval outputs."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations as P
from torch.nn.utils import parametrize

import normfold as nf
from tests.conftest import assert_models_close, assert_state_equal, randomize_bn_stats, run_eval, state_snapshot


def _old_weight_norm(m: nn.Module, **kw) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of parametrizations
        return nn.utils.weight_norm(m, **kw)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        _old_weight_norm(nn.Conv2d(3, 8, 3)),
        nn.ReLU(),
        nn.utils.spectral_norm(nn.Conv2d(8, 8, 3)),
        P.weight_norm(nn.Conv2d(8, 8, 3, groups=2), dim=1),
        P.spectral_norm(nn.ConvTranspose2d(8, 8, 2, stride=2), n_power_iterations=3),
        nn.Flatten(),
        P.spectral_norm(P.weight_norm(nn.Linear(8 * 8 * 8, 5))),
        _old_weight_norm(nn.Linear(5, 4, bias=False), dim=None),
    )


X = torch.randn(3, 3, 10, 10) * 2 + 0.5


def _advance(model: nn.Module) -> None:
    """A few training forwards, so spectral norm's u and v have moved away from their initialisation."""
    model.train()
    for _ in range(3):
        model(X)
    model.eval()


def test_bakes_every_style_with_bit_identical_eval_output() -> None:
    model = _model()
    _advance(model)
    ref = run_eval(model, (X,))
    r = nf.fold_weight_norm(model)
    kinds = sorted((c.paths[0], c.details["kind"], c.details["style"]) for c in r.changes)
    assert kinds == [("0", "weight_norm", "hook"), ("2", "spectral_norm", "hook"),
                     ("3", "weight_norm", "parametrization"), ("4", "spectral_norm", "parametrization"),
                     ("6", "weight_norm+spectral_norm", "parametrization"), ("7", "weight_norm", "hook")]
    out = r.module
    assert torch.equal(run_eval(out, (X,)), ref)
    for m in out.modules():
        assert not parametrize.is_parametrized(m)
        assert not m._forward_pre_hooks and not m._state_dict_hooks
    assert [type(m) for m in out] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.Conv2d, nn.ConvTranspose2d, nn.Flatten,
                                      nn.Linear, nn.Linear]
    keys = set(out.state_dict())
    assert keys == {f"{i}.{n}" for i in (0, 2, 3, 4, 6) for n in ("weight", "bias")} | {"7.weight"}
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in out.parameters())


def test_input_untouched_and_still_working_flags_kept() -> None:
    model = _model()
    _advance(model)
    model.train()
    model[3].eval()
    snap = state_snapshot(model)
    r = nf.fold_weight_norm(model)
    # the caller's model keeps its parametrizations (a deep copy shares the generated class; see the pass)
    assert parametrize.is_parametrized(model[3]) and hasattr(model[0], "weight_g")
    assert_state_equal(model, snap)
    assert model.training and not model[3].training
    assert r.module.training and not r.module[3].training
    model.eval()
    assert torch.equal(run_eval(model, (X,)), run_eval(r.module, (X,)))
    assert_state_equal(model, snap)  # and evaluating it did not advance u, v


def test_baking_does_not_run_power_iterations_in_training_mode() -> None:
    model = _model()
    _advance(model)
    ref = run_eval(model, (X,))
    model.train()  # a training-mode model: baking must still use the stored u, v as eval does
    r = nf.fold_weight_norm(model)
    assert torch.equal(run_eval(r.module, (X,)), ref)


def test_requires_grad_kept_and_inplace() -> None:
    lin = P.weight_norm(nn.Linear(4, 3))
    for p in lin.parameters():
        p.requires_grad_(False)
    lin2 = nn.utils.spectral_norm(nn.Linear(4, 3))
    lin2.weight_orig.requires_grad_(False)
    model = nn.Sequential(lin, lin2)
    r = nf.fold_weight_norm(model, inplace=True)
    assert r.module is model
    assert not model[0].weight.requires_grad and not model[1].weight.requires_grad
    assert isinstance(model[0].weight, nn.Parameter) and model[1].bias.requires_grad


def test_spectral_norm_parametrization_keeps_the_parameter_object_inplace() -> None:
    lin = P.spectral_norm(nn.Linear(4, 3))
    original = lin.parametrizations.weight.original
    nf.fold_weight_norm(lin, inplace=True)
    assert lin.weight is original  # an optimizer built before baking keeps training the weight


def test_other_parametrizations_are_skipped() -> None:
    model = nn.Sequential(P.orthogonal(nn.Linear(4, 4)), P.weight_norm(nn.Linear(4, 2)))
    r = nf.fold_weight_norm(model)
    assert [c.paths[0] for c in r.changes] == ["1"]
    [skip] = r.skipped
    assert skip.paths == ("0",) and "_Orthogonal" in skip.reason
    assert parametrize.is_parametrized(r.module[0])


def test_then_fold_batchnorm_folds_into_the_baked_conv() -> None:
    model = nn.Sequential(P.weight_norm(nn.Conv2d(3, 8, 3)), nn.BatchNorm2d(8), nn.ReLU())
    model = randomize_bn_stats(model).eval()
    before = nf.fold_batchnorm(model, example_inputs=(X,))
    assert not before.modified and "fold_weight_norm" in before.skipped[0].reason
    baked = nf.fold_weight_norm(model).module
    folded = nf.fold_batchnorm(baked, example_inputs=(X,))
    assert folded.modified
    assert_models_close(folded.module, model, (X,))


@pytest.mark.zoo
def test_hifigan_style_generator_weight_norm_everywhere() -> None:
    """A vocoder-style stack (weight_norm on every conv, as HiFi-GAN ships), baked for deployment."""
    torch.manual_seed(1)
    layers: list[nn.Module] = [P.weight_norm(nn.Conv1d(16, 32, 7, padding=3))]
    for _ in range(4):
        layers += [nn.LeakyReLU(0.1), P.weight_norm(nn.ConvTranspose1d(32, 32, 4, stride=2, padding=1)),
                   nn.LeakyReLU(0.1), P.weight_norm(nn.Conv1d(32, 32, 3, padding=2, dilation=2))]
    layers += [P.weight_norm(nn.Conv1d(32, 1, 7, padding=3)), nn.Tanh()]
    model = nn.Sequential(*layers).eval()
    x = torch.randn(2, 16, 20)
    r = nf.fold_weight_norm(model)
    assert len(r.changes) == 10
    assert torch.equal(run_eval(r.module, (x,)), run_eval(model, (x,)))


@pytest.mark.zoo
def test_transformers_wav2vec2_positional_conv() -> None:
    """Hugging Face's Wav2Vec2 keeps weight_norm (dim=2) on its positional conv embedding: bake it."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(2)
    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                         num_conv_pos_embedding_groups=4)
    model = Wav2Vec2Model(cfg).eval()
    x = torch.randn(2, 800)
    r = nf.fold_weight_norm(model)
    assert [c.paths[0] for c in r.changes] == ["encoder.pos_conv_embed.conv"]
    assert not parametrize.is_parametrized(r.module.encoder.pos_conv_embed.conv)
    ref = run_eval(model, (x,)).last_hidden_state
    assert torch.equal(run_eval(r.module, (x,)).last_hidden_state, ref)
