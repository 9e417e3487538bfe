"""Output comparison: errors, the tolerance that would have passed, NaN/Inf, shapes, dtypes, naming."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from normfold.check.compare import compare_flat, compare_outputs, flatten_outputs, name_outputs
from normfold.check.inputs import load_inputs
from normfold.errors import InputError, UsageError
from normfold.tolerances import Tolerance, policy


def test_the_policy_fits_any_output_magnitude() -> None:
    s = policy(torch.float32).scaled  # no tolerance given: each output is judged by the policy of its dtype
    for scale in (1e-3, 1.0, 1e4):
        ref = torch.linspace(-1, 1, 101) * scale
        ok = compare_outputs(ref, ref + 0.5 * s * scale)[0]
        bad = compare_outputs(ref, ref + 2 * s * scale)[0]
        assert ok.passed and not bad.passed
        assert math.isclose(bad.scaled_error, 2 * s, rel_tol=1e-2) and math.isclose(bad.scale, scale, rel_tol=1e-5)
        assert f"> {s:g} x scale {scale:.3g} (margin " in bad.problem and 0.49 < bad.margin < 0.51, bad.problem
        assert ok.margin > 1.9 and ok.verdict().startswith("max |a - b| ") and f"<= {s:g} x scale" in ok.verdict()


def test_allclose_semantics_and_the_tolerance_that_would_have_passed() -> None:
    # a test of the explicit --atol/--rtol rule itself (what a user may ask for instead of the policy)
    ref = torch.tensor([1.0, 10.0, 100.0])
    cand = ref + torch.tensor([0.01, 0.01, 0.5])
    c = compare_outputs(ref, cand, Tolerance(atol=1e-3, rtol=1e-3))[0]
    assert not c.passed
    assert c.atol_needed == pytest.approx(0.4, rel=1e-4)  # 0.5 - 1e-3 * 100
    assert c.rtol_needed == pytest.approx(0.01 - 1e-3, rel=1e-4)  # the element 1.0 is off by 1%
    assert compare_outputs(ref, cand, Tolerance(atol=c.atol_needed * 1.001, rtol=1e-3))[0].passed
    assert compare_outputs(ref, cand, Tolerance(atol=1e-3, rtol=c.rtol_needed * 1.001))[0].passed
    assert c.max_abs == pytest.approx(0.5) and c.mean_abs == pytest.approx(0.52 / 3)
    assert c.max_rel == pytest.approx(0.01)


def test_nan_inf_shape_dtype_and_missing_outputs() -> None:
    tol = policy(torch.float32)
    ref = torch.ones(4)
    c = compare_outputs(ref, torch.tensor([1.0, float("nan"), float("inf"), 1.0]), tol)[0]
    assert not c.passed and c.nan_count == 1 and c.inf_count == 1 and "NaN" in c.problem
    both = torch.tensor([1.0, float("inf")])
    assert compare_outputs(both, both.clone(), tol)[0].passed  # the same Inf on both sides is equal
    assert "shape" in compare_outputs(ref, torch.ones(5), tol)[0].problem
    assert "dtype" in compare_outputs(torch.ones(3, dtype=torch.long), torch.ones(3), tol)[0].problem
    res = compare_outputs({"a": ref, "b": ref}, {"a": ref, "c": ref}, tol)
    assert [(r.name, r.passed) for r in res] == [("out.a", True), ("out.b", False), ("out.c", False)]
    assert compare_outputs(torch.empty(0, 3), torch.empty(0, 3), tol)[0].passed


def test_flatten_and_name_outputs() -> None:
    out = {"logits": torch.ones(2), "aux": (torch.zeros(1), None, 3)}
    flat = flatten_outputs(out)
    assert list(flat) == ["out.logits", "out.aux.0"]
    named = name_outputs(list(flat), [torch.ones(2), torch.zeros(1), torch.ones(3)])
    assert list(named) == ["out.logits", "out.aux.0", "onnx.2"]
    assert all(c.passed for c in compare_flat(flat, dict(list(named.items())[:2]), policy(torch.float32)))


def test_load_inputs_from_files(tmp_path) -> None:
    a, b = torch.randn(2, 3), torch.randint(0, 5, (2, 4))
    torch.save(a, tmp_path / "one.pt")
    torch.save((a, b), tmp_path / "two.pt")
    torch.save({"x": a, "ids": b}, tmp_path / "dict.pt")
    np.save(tmp_path / "a.npy", a.numpy())
    np.savez(tmp_path / "ab.npz", x=a.numpy(), ids=b.numpy())
    assert torch.equal(load_inputs(tmp_path / "one.pt")[0], a)
    for name in ("two.pt", "dict.pt", "ab.npz"):
        got = load_inputs(tmp_path / name)
        assert len(got) == 2 and torch.equal(got[0], a) and torch.equal(got[1], b), name
    assert torch.equal(load_inputs(tmp_path / "a.npy")[0], a)
    with pytest.raises(UsageError, match=".npz"):
        load_inputs(tmp_path / "x.csv")
    with pytest.raises(InputError, match="no such file"):
        load_inputs(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(InputError, match="not a readable input file"):
        load_inputs(tmp_path / "junk.pt")
    torch.save({"x": 3}, tmp_path / "bad.pt")
    with pytest.raises(InputError, match="not a tensor"):
        load_inputs(tmp_path / "bad.pt")


def test_explicit_tolerances_replace_the_default_rule() -> None:
    import normfold as nf
    from tests.check._models import inputs, plant_net

    m, x = plant_net(), inputs()
    cand = nf.fold_batchnorm(m, example_inputs=x).module
    with torch.no_grad():
        cand.fc.bias += 1e-3  # off by 1e-3 absolute: fails the default 2e-5 of the scale
    strict = nf.check(m, candidate=cand, inputs=x, export=False, probes=False)
    assert not strict.passed and strict.scale_tol == policy(torch.float32).scaled
    loose = nf.check(m, candidate=cand, inputs=x, export=False, probes=False, atol=2e-3)
    assert loose.passed and (loose.atol, loose.rtol, loose.scale_tol) == (2e-3, 0.0, 0.0)
    assert "|a - b| <= 0.002" in loose.to_text()
    assert nf.check(m, candidate=cand, inputs=x, export=False, probes=False, scale_tol=1e-2).passed
    with pytest.raises(UsageError, match="atol"):
        nf.check(m, candidate=cand, inputs=x, export=False, atol=-1.0)
