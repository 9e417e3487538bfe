"""LayerNorm -> RMSNorm on Hugging Face ``transformers`` models as they come, one tiny config per family.

Each model is built from a small config (2 layers, hidden 32, vocab 100, random
weights perturbed by 0.02 * N(0, 1), LayerNorm scales by 0.2 * N(0, 1)) with
its default config otherwise (``use_cache=True`` for the causal LMs), called
with keyword inputs (``input_ids`` + an ``attention_mask`` with padding,
``pixel_values``, ``input_features``), and converted with ``mode="auto"``.
The converted model is called the way the user calls it and every output
tensor (logits, hidden states) is compared with the original's:

* an exact family converts every LayerNorm exactly, and its outputs match
  by :func:`normfold.verify.compare` (the policy); the edits it needs
  (untie a head, one centring op, a folded LayerScale) are reported;
* a family that cannot be exact says why, naming what blocks it, and the
  output error the pass reports is the one measured here.

The model's class, config (``use_cache`` included) and outputs structure are
the user's own afterwards. The README's "LayerNorm -> RMSNorm" table is these rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from normfold import layernorm_to_rmsnorm
from normfold.verify import compare
from tests.conftest import output_error
from tests.zoo.hf_families import FAMILIES

pytest.importorskip("transformers")
pytestmark = pytest.mark.zoo


@dataclass(frozen=True)
class Expect:
    exact: bool
    #: for an exact family, the change actions it must report (besides centre and to_rmsnorm)
    actions: tuple[str, ...] = ()
    #: for a family that is not (entirely) exact, a phrase every approximate layer's reason contains
    reason: str = ""
    #: layers converted exactly even so (the residual stream of a model whose q/k LayerNorms are approximate)
    exact_layers: int = 0


EXPECT: dict[str, Expect] = {
    "gpt2": Expect(True, ("untie",)),               # HF Conv1D = addmm with an (in, out) weight; dtype casts
    "opt": Expect(True, ("untie",)),                # dtype cast in the stream; tied head under torch.export
    "bloom": Expect(True, ("untie", "centre_op")),  # the stream starts at word_embeddings_layernorm
    "falcon": Expect(True, ("untie",)),             # FalconLinear: its forward traces to x W^T + b
    "gpt_neox": Expect(True),
    "gptj": Expect(True),
    "phi": Expect(True),
    "vit": Expect(True),                            # class token expanded to the batch
    "whisper_encoder": Expect(True, ("centre_op",)),  # GELU conv stem: one centring op where layer 0 starts
    "whisper": Expect(True, ("centre_op", "untie")),
    "clip_text": Expect(True),
    "biogpt": Expect(True, ("untie",)),
    "codegen": Expect(True),
    "gpt_neo": Expect(True, ("untie",)),
    "xglm": Expect(True, ("untie", "centre_op")),  # sinusoidal positions: a computed table, one centring op
    "mpt": Expect(True, ("untie",)),
    "stablelm": Expect(True),
    "gpt_bigcode": Expect(True, ("untie",)),
    "beit": Expect(True, ("fold_scale",)),          # LayerScale (lambda_1, lambda_2) folded into the writers
    "dinov2": Expect(True, ("fold_scale",)),        # Dinov2LayerScale
    "clip_vision": Expect(False, reason="also read by the model output", exact_layers=1),  # pre_layrnorm exact;
    # last_hidden_state is the raw residual stream (no final LayerNorm), so no change to the stream is allowed
    "bert": Expect(False, reason="post-LN block", exact_layers=1),  # the embedding LayerNorm alone is exact
}


def _call(model: torch.nn.Module, inputs: dict) -> object:
    with torch.no_grad():
        return model(**inputs)


@pytest.mark.parametrize("family", list(EXPECT))
def test_family(family: str) -> None:
    expect = EXPECT[family]
    model, inputs = FAMILIES[family]()
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    reference = _call(model, inputs)

    r = layernorm_to_rmsnorm(model, mode="auto", example_inputs=inputs)

    out = r.module
    assert type(out) is type(model) and type(model).__name__ == type(out).__name__
    assert getattr(out.config, "use_cache", None) == use_cache == getattr(model.config, "use_cache", None)
    actual = _call(out, inputs)
    assert type(actual) is type(reference)
    convs = {c.paths[0]: c.details for c in r.changes if c.action == "to_rmsnorm"}
    assert convs and not [s for s in r.skipped if "functional" not in s.reason]
    exact = [p for p, d in convs.items() if d["conversion"] == "exact"]
    approx = {p: d["reason"] for p, d in convs.items() if d["conversion"] == "approx"}
    if expect.exact:
        assert not approx, f"{family}: {approx}"
        actions = {c.action for c in r.changes}
        assert set(expect.actions) <= actions, f"{family}: {actions}"
        assert r.metrics["exact_verified"] is True and r.metrics["output_within_tolerance"] is True
        v = compare(reference, actual)  # exact: normfold.verify's rule (the policy), as `convert --to rmsnorm` judges
        assert v.passed, f"{family} exact: {v.describe()}"
    else:
        assert len(exact) == expect.exact_layers, f"{family}: {exact}"
        assert approx and all(expect.reason in why for why in approx.values()), f"{family}: {approx}"
        measured = output_error(actual, reference)[0]
        # approximate by design: it really changes the outputs (the verdict fails), and says by how much
        assert not compare(reference, actual).passed
        assert r.metrics["output_max_abs_error"] == pytest.approx(measured, rel=1e-6, abs=1e-9)
