"""onnxruntime sessions: providers asked for, providers that actually started, and why one did not.

onnxruntime-gpu lists ``CUDAExecutionProvider`` in ``get_available_providers()``
on machines where it cannot start (no driver, no GPU, wrong CUDA or cuDNN): the
session is then created on the next provider in the list, with only a line on
stderr to say so. normfold therefore never trusts the available list: the
provider used is ``session.get_providers()[0]``, and the reason a requested
provider did not start is read from what onnxruntime printed while the session
was created (captured from file descriptor 2, and logged at debug level).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from normfold.errors import ModelLoadError, UsageError

__all__ = ["PROVIDER_ALIASES", "resolve_providers", "OrtRuntime", "create_session", "short_provider"]

log = logging.getLogger(__name__)

#: short names accepted by ``providers=`` / ``--provider`` / ``--require-provider``
PROVIDER_ALIASES: dict[str, str] = {
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
}


#: the last reason onnxruntime gave for each provider that did not start, in this process
_LAST_REASON: dict[str, str] = {}


def short_provider(name: str) -> str:
    """``CUDAExecutionProvider`` -> ``cuda`` (names without an alias come back unchanged)."""
    for short, full in PROVIDER_ALIASES.items():
        if full == name and short not in ("trt", "directml"):
            return short
    return name


def resolve_providers(providers: Sequence[str] | str) -> list[str]:
    """Map short names (``"cuda"``, ``"cpu"``) to onnxruntime provider names; keep full names as they are.

    The CPU provider is always appended last if missing: onnxruntime falls back
    to it anyway, and saying so keeps the report honest.
    """
    if isinstance(providers, str):
        providers = [p for p in providers.replace(" ", "").split(",") if p]
    out: list[str] = []
    for p in providers:
        full = PROVIDER_ALIASES.get(p.lower(), p)
        if not full.endswith("ExecutionProvider"):
            known = ", ".join(sorted(k for k in PROVIDER_ALIASES if k not in ("trt", "directml")))
            raise UsageError(f"unknown onnxruntime provider {p!r}; use one of {known} (or a full name like "
                             "CUDAExecutionProvider)")
        if full not in out:
            out.append(full)
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")
    return out


@contextlib.contextmanager
def _capture_fd2() -> Iterator[list[str]]:
    """Capture what C++ code writes to file descriptor 2 (onnxruntime's default logger) into a list of lines."""
    lines: list[str] = []
    fd = 2  # onnxruntime's C++ logger writes to file descriptor 2 whatever Python's sys.stderr is (pytest, notebooks)
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    try:
        saved = os.dup(fd)
    except OSError:  # no file descriptor 2 at all: nothing to capture
        yield lines
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield lines
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", "replace")
            # strip ANSI colour codes onnxruntime adds on terminals
            text = re.sub(r"\x1b\[[0-9;]*m", "", text)
            lines.extend(ln for ln in text.splitlines() if ln.strip())


def _fallback_reason(provider: str, lines: Sequence[str]) -> str:
    """The most useful line onnxruntime printed about ``provider`` failing to start."""
    short = provider.replace("ExecutionProvider", "")
    relevant = [ln for ln in lines if short.lower() in ln.lower() or "libcuda" in ln or "cudnn" in ln.lower()]
    for ln in relevant:
        m = re.search(r"with error: (.*)", ln)
        if m:
            return m.group(1).strip()
    for ln in relevant:
        m = re.search(r"Failed to create \w+\. (.*)", ln)
        if m:
            return f"failed to create {provider}: {m.group(1).strip()[:240]}"
    if relevant:
        return re.sub(r"^.*?\] ", "", relevant[-1]).strip()[:300]
    return f"onnxruntime did not start {provider} (it printed no reason)"


@dataclass
class OrtRuntime:
    """An onnxruntime session and the truth about its providers.

    ``requested`` is what was asked for, in order; ``used`` is
    ``session.get_providers()`` (the first entry runs every node it can);
    ``not_started`` maps each requested provider that is not in ``used`` to
    the reason onnxruntime gave.
    """

    session: Any
    requested: list[str]
    used: list[str]
    not_started: dict[str, str] = field(default_factory=dict)
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    input_types: list[str] = field(default_factory=list)

    @property
    def provider(self) -> str:
        """The provider that runs the model."""
        return self.used[0] if self.used else "none"

    def describe(self) -> str:
        """One sentence: which provider ran, and why the ones before it in the list did not."""
        text = f"onnxruntime ran on {self.provider}"
        if self.not_started:
            parts = [f"{p} requested but did not start: {r}" for p, r in self.not_started.items()]
            text += " (" + "; ".join(parts) + ")"
        return text

    def run(self, inputs: Sequence[Any], output_names: Sequence[str] | None = None) -> list[torch.Tensor]:
        """Run on positional ``inputs`` (tensors or arrays); returns the outputs as CPU tensors."""
        if len(inputs) != len(self.input_names):
            raise ValueError(f"the ONNX model takes {len(self.input_names)} input(s) "
                             f"({', '.join(self.input_names)}), got {len(inputs)}")
        feed = {name: _to_numpy(x, t) for name, x, t in zip(self.input_names, inputs, self.input_types)}
        outs = self.session.run(list(output_names) if output_names else None, feed)
        return [torch.from_numpy(np.ascontiguousarray(o)) if isinstance(o, np.ndarray) else torch.as_tensor(o)
                for o in outs]


_ORT_TO_NUMPY = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_, "tensor(int16)": np.int16,
}


def _to_numpy(x: Any, ort_type: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bfloat16:
            x = x.float()
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    want = _ORT_TO_NUMPY.get(ort_type)
    if want is not None and arr.dtype != want:
        arr = arr.astype(want)
    return np.ascontiguousarray(arr)


def create_session(model: str | os.PathLike | bytes | Any, providers: Sequence[str] | str = ("cuda", "cpu"), *,
                   threads: int | None = None, spinning: bool = False,
                   options: Mapping[str, str] | None = None) -> OrtRuntime:
    """An onnxruntime session on the first provider of ``providers`` that starts.

    ``model`` is a path, serialized bytes or an ``onnx.ModelProto``.
    ``threads`` sets intra-op threads (onnxruntime's default: one per core);
    ``spinning=False`` stops idle worker threads from spinning, which on a
    machine shared with other jobs (CI) costs far more than it saves.
    Raises :class:`ModelLoadError` when onnxruntime cannot load the model.
    """
    import onnxruntime as ort

    requested = resolve_providers(providers)
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    for k, v in (options or {}).items():
        so.add_session_config_entry(k, v)
    if hasattr(model, "SerializeToString"):
        src: Any = model.SerializeToString()
    elif isinstance(model, (bytes, bytearray)):
        src = bytes(model)
    else:
        src = str(Path(model))
        if not Path(src).exists():
            raise ModelLoadError(f"{src}: no such ONNX file; check the path")
    available = set(ort.get_available_providers())
    asked = [p for p in requested if p in available]
    not_started: dict[str, str] = {p: f"not in this onnxruntime build (available: {', '.join(sorted(available))})"
                                   for p in requested if p not in available}
    with _capture_fd2() as lines:
        try:
            sess = ort.InferenceSession(src, so, providers=asked)
        except Exception as exc:
            msg = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            raise ModelLoadError(f"onnxruntime cannot load the ONNX model: {msg}; check the opset (--opset) and "
                                 "that the file is a complete export") from exc
    for ln in lines:
        log.debug("onnxruntime: %s", ln)
    used = list(sess.get_providers())
    for p in asked:
        if p not in used:
            reason = _fallback_reason(p, lines)
            if reason.endswith("(it printed no reason)") and p in _LAST_REASON:
                reason = _LAST_REASON[p]  # onnxruntime may say it only once per process
            _LAST_REASON[p] = reason
            not_started[p] = reason
    # keep lines that are not onnxruntime's on stderr, where they were going
    foreign = [ln for ln in lines if "onnxruntime" not in ln.lower() and "ExecutionProvider" not in ln]
    if foreign:
        sys.stderr.write("\n".join(foreign) + "\n")
    inputs = sess.get_inputs()
    return OrtRuntime(session=sess, requested=requested, used=used, not_started=not_started,
                      input_names=[i.name for i in inputs], output_names=[o.name for o in sess.get_outputs()],
                      input_types=[i.type for i in inputs])
