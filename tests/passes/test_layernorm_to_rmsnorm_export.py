"""Deployment of converted transformers: ONNX opset 23 (RMSNormalization), symbolic batch and sequence, normfold check.

Causal LMs (GPT-2, and BLOOM with its centring op; tied heads, default ``use_cache=True``) and an encoder (ViT)
from tiny configs are converted exactly, exported with
:func:`normfold.hf.export_onnx`, run in onnxruntime at another batch size and
sequence length than the export's, and checked with :func:`normfold.check`
against the original model.
"""

from __future__ import annotations

import pytest
import torch

import normfold as nf
from normfold import hf
from normfold.errors import InputError
from normfold.export import export_onnx
from normfold.verify import compare
from tests.zoo.hf_families import FAMILIES, VOCAB

pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("family", ["gpt2", "bloom", "vit"])
def test_converted_model_exports_at_opset_23_and_passes_check(family: str, tmp_path) -> None:
    model, inputs = FAMILIES[family]()
    r = nf.layernorm_to_rmsnorm(model, mode="auto", example_inputs=inputs)
    converted = r.module
    assert r.metrics["layers_approx"] == 0

    res = hf.export_onnx(converted, inputs, tmp_path / "m.onnx")

    proto = res.load()
    ops = {n.op_type for n in proto.graph.node}
    assert res.opset == 23 and "RMSNormalization" in ops and "LayerNormalization" not in ops
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert res.input_names == list(inputs)  # the keyword names, in order
    if family == "bloom":  # the centring op inside the converted embedding LayerNorm exports as ReduceMean + Sub
        assert {"ReduceMean", "Sub"} <= ops
    if family in ("gpt2", "bloom"):
        assert dims == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
        g = torch.Generator().manual_seed(5)
        other = {"input_ids": torch.randint(0, VOCAB, (3, 11), generator=g),
                 "attention_mask": torch.ones(3, 11, dtype=torch.long)}
    else:
        assert dims == {"pixel_values": ["batch", 3, 32, 32]}
        other = {"pixel_values": torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(5))}
    # another batch and sequence length than the export's: the ONNX model computes what the original does
    sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    onnx_out = sess.run(None, {k: v.numpy() for k, v in other.items()})
    with torch.no_grad():
        ref = model(**other)
    ref_logits = ref.logits if hasattr(ref, "logits") else ref.last_hidden_state
    v = compare(ref_logits, torch.from_numpy(onnx_out[0]))  # the one rule: normfold.verify's policy
    assert v.passed, v.describe()
    assert getattr(model.config, "use_cache", None) == getattr(converted.config, "use_cache", None)

    with hf.traceable(model, inputs) as positional, hf.traceable(converted, inputs):
        report = nf.check(model, candidate=converted, onnx=res.path, inputs=positional, providers=("cpu",),
                          threads=1)
    assert report.passed, str(report)


def test_dynamic_sequence_needs_a_2d_input() -> None:
    with pytest.raises(InputError, match="no 2-D"):
        export_onnx(torch.nn.Linear(4, 4), torch.randn(2, 3, 4), dynamic_sequence=True)
