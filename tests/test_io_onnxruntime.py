"""The CUDA path of normfold.check.runtime, on the parts a CPU machine can run.

Real onnxruntime (onnxruntime-gpu on a machine without a GPU: CUDA is listed
but cannot start) for the refusal path, and a stand-in session for what only
a GPU would show (CUDA started, every node on it; CUDA started, some node on
the CPU). tests/gpu runs the real thing where a CUDA device exists.
"""

from __future__ import annotations

import os
import types
from typing import Any

import pytest
import torch
from torch import nn

import normfold as nf
from normfold.check import runtime
from normfold.check.runtime import FALLBACK_OPTION, cpu_placements, create_session, preload_cuda_libraries
from normfold.verify import compare


@pytest.fixture(scope="module")
def onnx_bytes() -> bytes:
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [3, 2], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])], [w])
    # y = x @ W: the ONNX twin of _linear() below; IR version 10 is one every onnxruntime >= 1.16 reads
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10).SerializeToString()


W = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])


def _linear() -> nn.Module:
    lin = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(W.T)
    return lin.eval()


@pytest.fixture
def fresh_preload(monkeypatch):
    """Forget what an earlier session found, so that preload runs again."""
    monkeypatch.setattr(runtime, "_PRELOAD_NOTE", None)


def _cuda_starts() -> bool:
    return torch.cuda.is_available()


def test_preload_reports_what_torch_loaded(fresh_preload) -> None:
    import onnxruntime as ort

    note = preload_cuda_libraries(ort)
    assert note.startswith("CUDA libraries: ")
    loaded = runtime._cuda_libraries_loaded()
    if any(n.startswith("libcudart") for n in loaded):  # a CUDA build of torch: it loaded them on import
        assert "libcudart" in note and "loaded by torch" in note
    assert ("preload_dlls()" in note) == hasattr(ort, "preload_dlls")
    assert preload_cuda_libraries(ort) is note, "once per process"


def test_preload_without_preload_dlls_says_so(fresh_preload) -> None:
    fake = types.SimpleNamespace(__version__="1.17.0")
    assert "onnxruntime 1.17.0 has no preload_dlls()" in preload_cuda_libraries(fake)


def test_preload_failure_is_a_reason_not_a_crash(fresh_preload) -> None:
    def noisy() -> None:
        print("\x1b[33mFailed to load libcudnn.so.9: cannot open shared object file\x1b[0m")

    def broken() -> None:
        raise RuntimeError("Invalid parameter of directory=x. The directory does not exist!")

    note = preload_cuda_libraries(types.SimpleNamespace(preload_dlls=noisy))
    assert "it said: Failed to load libcudnn.so.9" in note and "\x1b" not in note
    runtime._PRELOAD_NOTE = None
    assert "preload_dlls() failed: RuntimeError: Invalid parameter" in preload_cuda_libraries(
        types.SimpleNamespace(preload_dlls=broken))


def test_required_cuda_that_cannot_start_is_refused_with_the_reason(onnx_bytes: bytes) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider")
    rt = create_session(onnx_bytes, ("cuda", "cpu"), require="cuda")
    x = torch.randn(4, 3)
    v = compare(x @ W, rt.run([x])[0])  # normfold.verify's rule, the policy
    assert v.passed, v.describe()
    if _cuda_starts():
        assert rt.provider == "CUDAExecutionProvider" and rt.fallback_disabled
        return
    assert rt.provider == "CPUExecutionProvider" and not rt.fallback_disabled
    why = rt.not_started["CUDAExecutionProvider"]
    assert "CPU fallback disabled" in why
    assert "CUDA libraries: " in rt.describe()


class _FakeSession:
    """Stands in for onnxruntime.InferenceSession where only a GPU could answer: records what it was given."""

    calls: list[tuple[list[str], str]] = []
    refuse: str | None = None

    def __init__(self, src: Any, so: Any, providers: list[str]) -> None:
        fallback = so.get_session_config_entry(FALLBACK_OPTION) if _has_entry(so, FALLBACK_OPTION) else ""
        _FakeSession.calls.append((list(providers), fallback))
        if fallback == "1" and _FakeSession.refuse:
            raise RuntimeError(_FakeSession.refuse)
        if so.log_severity_level == 0 and _FakeSession.refuse:  # onnxruntime's verbose placement report, on fd 2
            os.write(2, "\n".join(PLACEMENT_LOG).encode() + b"\n")
        self._providers = list(providers) + ([] if "CPUExecutionProvider" in providers else ["CPUExecutionProvider"])

    def get_providers(self) -> list[str]:
        return self._providers

    def get_inputs(self) -> list:
        return [types.SimpleNamespace(name="x", type="tensor(float)")]

    def get_outputs(self) -> list:
        return [types.SimpleNamespace(name="y")]


def _has_entry(so: Any, key: str) -> bool:
    try:
        so.get_session_config_entry(key)
        return True
    except Exception:
        return False


@pytest.fixture
def fake_gpu(monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "InferenceSession", _FakeSession)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    _FakeSession.calls = []
    _FakeSession.refuse = None
    return _FakeSession


def test_required_cuda_disables_the_cpu_fallback(fake_gpu, onnx_bytes: bytes) -> None:
    rt = create_session(onnx_bytes, ("cuda", "cpu"), require="cuda")
    # the CPU provider is left out: onnxruntime refuses the option when it is listed explicitly
    assert fake_gpu.calls == [(["CUDAExecutionProvider"], "1")]
    assert rt.provider == "CUDAExecutionProvider" and rt.fallback_disabled
    assert "every node" in rt.describe() and "CUDA libraries: " in rt.describe()


def test_not_required_keeps_the_fallback(fake_gpu, onnx_bytes: bytes) -> None:
    rt = create_session(onnx_bytes, ("cuda", "cpu"))
    assert fake_gpu.calls == [(["CUDAExecutionProvider", "CPUExecutionProvider"], "")]
    assert rt.provider == "CUDAExecutionProvider" and not rt.fallback_disabled


def test_cuda_with_nodes_left_on_the_cpu_is_refused(fake_gpu, onnx_bytes: bytes) -> None:
    fake_gpu.refuse = ("[ONNXRuntimeError] : 1 : FAIL : This session contains graph nodes that are assigned to the "
                       "default CPU EP, but fallback to CPU EP has been explicitly disabled by the user.")
    rt = create_session(onnx_bytes, ("cuda", "cpu"), require="cuda")
    assert [c[1] for c in fake_gpu.calls] == ["1", "", ""], "refused strictly, compared on the CPU, placements read"
    assert rt.provider == "CPUExecutionProvider"
    why = rt.not_started["CUDAExecutionProvider"]
    assert "started, but onnxruntime would still run some nodes on the CPU: Shape x2, Gather (3 node(s))" in why
    assert [c[0] for c in fake_gpu.calls][2] == ["CUDAExecutionProvider", "CPUExecutionProvider"], "the diagnostic"


#: the "Node placements" report of onnxruntime's verbose log (session_state.cc), as it prints it
PLACEMENT_LOG = [
    "2026-01-01 00:00:00.0 [V:onnxruntime:, session_state.cc:1578 VerifyEachNodeIsAssignedToAnEp] Node placements",
    "2026-01-01 00:00:00.0 [V:onnxruntime:, session_state.cc:1581 VerifyEachNodeIsAssignedToAnEp]  Node(s) placed on "
    "[CUDAExecutionProvider]. Number of nodes: 5",
    "2026-01-01 00:00:00.0 [V:onnxruntime:, session_state.cc:1583 VerifyEachNodeIsAssignedToAnEp]   Conv (/conv/Conv)",
    "2026-01-01 00:00:00.0 [V:onnxruntime:, session_state.cc:1581 VerifyEachNodeIsAssignedToAnEp]  Node(s) placed on "
    "[CPUExecutionProvider]. Number of nodes: 3",
    "2026-01-01 00:00:00.0 [V:onnxruntime:, session_state.cc:1583 VerifyEachNodeIsAssignedToAnEp]   Shape (/Shape)",
    "2026-01-01 00:00:00.0 [V:onnxruntime:, session_state.cc:1583 VerifyEachNodeIsAssignedToAnEp]   Gather (/Gather)",
    "2026-01-01 00:00:00.0 [V:onnxruntime:, session_state.cc:1583 VerifyEachNodeIsAssignedToAnEp]   Shape (/Shape_1)",
]


def test_cpu_placements_reads_the_verbose_report() -> None:
    assert cpu_placements(PLACEMENT_LOG) == "Shape x2, Gather (3 node(s))"
    assert cpu_placements(PLACEMENT_LOG[:3]) == ""  # everything on CUDA
    # where one provider takes everything onnxruntime prints the count only
    assert cpu_placements(["[V:onnxruntime:, session_state.cc:1581 VerifyEachNodeIsAssignedToAnEp]  All nodes "
                           "placed on [CPUExecutionProvider]. Number of nodes: 2"]) == "2 node(s)"


def test_check_with_required_cuda_fails_with_the_reason_here(onnx_bytes: bytes) -> None:
    """The checker passes --require-provider to the session: on a machine without CUDA it fails, saying why."""
    import onnxruntime as ort

    if _cuda_starts() or "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("CUDA starts here (tests/gpu covers the passing case) or this onnxruntime has no CUDA provider")
    report = nf.check(_linear(), onnx=onnx_bytes, input_shapes=[(2, 3)], require_provider="cuda", probes=False)
    assert not report.passed
    provider = next(c for c in report.checks if c.name == "provider")
    assert "cuda was required" in provider.message and "CPU fallback disabled" in provider.message
