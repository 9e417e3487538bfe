"""onnxruntime sessions: providers asked for, providers that actually started, and why one did not.

onnxruntime-gpu lists ``CUDAExecutionProvider`` in ``get_available_providers()``
on machines where it cannot start (no driver, no GPU, wrong CUDA or cuDNN): the
session is then created on the next provider in the list, with only a line on
stderr to say so. normfold therefore never trusts the available list: the
provider used is ``session.get_providers()[0]``, and the reason a requested
provider did not start is read from what onnxruntime printed while the session
was created (captured from file descriptor 2, and logged at debug level).

The CUDA provider needs the CUDA and cuDNN libraries that torch's nvidia
wheels ship. Whether onnxruntime finds them depends on torch having loaded
them first (onnxruntime's CUDA 12/13 wheel split broke its own lookup for
some installs), so before a CUDA session is created normfold imports torch
and calls ``onnxruntime.preload_dlls()`` where it exists, and the provider
line says which CUDA/cuDNN libraries the process holds and who loaded them.

``require="cuda"`` (``--require-provider cuda``) also sets the session
option ``session.disable_cpu_ep_fallback`` and leaves the CPU provider out,
so that "ran on CUDA" holds for every node: onnxruntime then refuses a
session in which any node would run on the CPU. normfold reports that
refusal as the reason CUDA did not run and compares on a CPU session.
"""

from __future__ import annotations

import contextlib
import io
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

__all__ = ["PROVIDER_ALIASES", "resolve_providers", "OrtRuntime", "create_session", "short_provider",
           "preload_cuda_libraries", "FALLBACK_OPTION"]

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

#: the session option that stops onnxruntime from placing nodes on the CPU provider
FALLBACK_OPTION = "session.disable_cpu_ep_fallback"

#: what preload_cuda_libraries found, once per process
_PRELOAD_NOTE: str | None = None

_CUDA_LIBRARY = re.compile(r"lib(cudart|cudnn[a-z_]*|cublas(Lt)?|cufft|curand|nvrtc|nvJitLink|cusparse|cusolver)"
                           r"[.-][^/]*$")


def _cuda_libraries_loaded() -> dict[str, str]:
    """CUDA/cuDNN shared libraries mapped into this process: file name -> path (Linux: /proc/self/maps)."""
    found: dict[str, str] = {}
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and _CUDA_LIBRARY.match(os.path.basename(parts[-1])):
                    found.setdefault(os.path.basename(parts[-1]), parts[-1])
    except OSError:
        # no /proc (macOS, Windows) or a sandbox that hides it: the provider line then lists no library,
        # which is all this is for (it never decides which provider runs)
        pass
    return found


def _library_summary(names: Sequence[str]) -> str:
    key = ("libcudart", "libcudnn.", "libcublas.")
    shown = sorted(n for n in names if n.startswith(key))
    rest = len(names) - len(shown)
    return ", ".join(shown) + (f" and {rest} more" if rest > 0 else "")


def preload_cuda_libraries(ort: Any | None = None) -> str:
    """Load CUDA and cuDNN for onnxruntime's CUDA provider; one sentence saying what was loaded, or why not.

    torch is imported first (its CUDA build loads the libraries its nvidia
    wheels ship); then ``onnxruntime.preload_dlls()`` (onnxruntime >= 1.21)
    loads whatever is still missing from those wheels or the default search
    path. That function prints its failures instead of raising: they are
    captured and become the reason. The result is cached per process.
    """
    global _PRELOAD_NOTE
    if _PRELOAD_NOTE is not None:
        return _PRELOAD_NOTE
    if ort is None:
        import onnxruntime as ort
    before = _cuda_libraries_loaded()
    origin = "by torch" if before else ""
    preload = getattr(ort, "preload_dlls", None)
    printed = ""
    if preload is None:
        how = f"onnxruntime {getattr(ort, '__version__', '?')} has no preload_dlls()"
    else:
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf), _capture_fd2() as lines:
                preload()
        except Exception as exc:  # preload_dlls raises on a bad directory; any failure is a reason, not a crash
            how = f"onnxruntime.preload_dlls() failed: {type(exc).__name__}: {exc}"
        else:
            printed = " ".join(ln.strip() for ln in (buf.getvalue().splitlines() + list(lines)) if ln.strip())
            added = sorted(set(_cuda_libraries_loaded()) - set(before))
            how = (f"onnxruntime.preload_dlls() loaded {_library_summary(added)}" if added
                   else "onnxruntime.preload_dlls() loaded no more")
            if printed:
                said = re.sub(r"\x1b\[[0-9;]*m", "", printed)  # preload_dlls colours its warnings
                how += f" (it said: {said[:200]})"
    after = _cuda_libraries_loaded()
    if after:
        note = f"CUDA libraries: {_library_summary(list(before))} loaded {origin}; {how}" if before \
            else f"CUDA libraries: {how}"
    else:
        note = f"CUDA libraries: none loaded (torch {torch.__version__} loaded none; {how})"
    _PRELOAD_NOTE = note
    log.debug(note)
    return note


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
    #: what preload_cuda_libraries found (empty when CUDA was not requested)
    cuda_libraries: str = ""
    #: True when the session ran with session.disable_cpu_ep_fallback (every node on the required provider)
    fallback_disabled: bool = False
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
        if self.fallback_disabled:
            text += " (every node: CPU fallback disabled)"
        if self.not_started:
            parts = [f"{p} requested but did not start: {r}" for p, r in self.not_started.items()]
            text += " (" + "; ".join(parts) + ")"
        if self.cuda_libraries:
            text += f"; {self.cuda_libraries}"
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


def _session_options(ort: Any, threads: int | None, spinning: bool, options: Mapping[str, str] | None) -> Any:
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    for k, v in (options or {}).items():
        so.add_session_config_entry(k, v)
    return so


_PLACED = re.compile(r"(?:Node\(s\)|All nodes) placed on \[(\w+)\]\. Number of nodes: (\d+)")
_PLACED_NODE = re.compile(r"VerifyEachNodeIsAssignedToAnEp\]\s{2,}(\w+) \(")


def cpu_placements(lines: Sequence[str]) -> str:
    """From onnxruntime's verbose "Node placements" log: the ops placed on the CPU, e.g. ``"Shape x2, Gather (3 nodes)"``."""
    current, ops = None, []
    count = 0
    for ln in lines:
        m = _PLACED.search(ln)
        if m:
            current = m.group(1)
            if current == "CPUExecutionProvider":
                count = int(m.group(2))
            continue
        n = _PLACED_NODE.search(ln)
        if n and current == "CPUExecutionProvider":
            ops.append(n.group(1))
    if not count:
        return ""
    tally: dict[str, int] = {}
    for op in ops:
        tally[op] = tally.get(op, 0) + 1
    listed = ", ".join(f"{op} x{k}" if k > 1 else op for op, k in sorted(tally.items(), key=lambda kv: -kv[1]))
    return f"{listed} ({count} node(s))" if listed else f"{count} node(s)"


def _cpu_nodes(ort: Any, src: Any, threads: int | None, spinning: bool, options: Mapping[str, str] | None,
               required: str) -> str:
    """Which nodes onnxruntime keeps on the CPU beside ``required``: a verbose session, read and dropped.

    onnxruntime places small shape computations (Shape, Gather on a shape, Concat of sizes) on the CPU on
    purpose; naming them tells the user what stands between the model and "every node on CUDA".
    """
    so = _session_options(ort, threads, spinning, options)
    so.log_severity_level = 0  # VERBOSE: the "Node placements" report
    try:
        with _capture_fd2() as lines:
            ort.InferenceSession(src, so, providers=[required, "CPUExecutionProvider"])
    except Exception:  # a diagnostic: its failure leaves the reason as onnxruntime gave it
        return ""
    return cpu_placements(lines)


def create_session(model: str | os.PathLike | bytes | Any, providers: Sequence[str] | str = ("cuda", "cpu"), *,
                   threads: int | None = None, spinning: bool = False,
                   options: Mapping[str, str] | None = None, require: str | None = None) -> OrtRuntime:
    """An onnxruntime session on the first provider of ``providers`` that starts.

    ``model`` is a path, serialized bytes or an ``onnx.ModelProto``.
    ``threads`` sets intra-op threads (onnxruntime's default: one per core);
    ``spinning=False`` stops idle worker threads from spinning, which on a
    machine shared with other jobs (CI) costs far more than it saves.
    ``require`` (a provider other than the CPU) asks for every node on that
    provider: the session is created with ``session.disable_cpu_ep_fallback``
    and without the CPU provider; when onnxruntime refuses (the provider did
    not start, or some node would run on the CPU) the refusal is recorded in
    ``not_started`` and the session is created on the CPU instead, so the
    outputs can still be compared and the provider check fails with the
    reason. Raises :class:`ModelLoadError` when onnxruntime cannot load the
    model.
    """
    import onnxruntime as ort

    requested = resolve_providers(providers)
    required = resolve_providers([require])[0] if require is not None else None
    if required == "CPUExecutionProvider":
        required = None  # CPU is always there: nothing to enforce
    if required is not None and required not in requested:
        requested = [required] + [p for p in requested if p != required]
    so = _session_options(ort, threads, spinning, options)
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
    cuda_note = preload_cuda_libraries(ort) if "CUDAExecutionProvider" in asked else ""
    strict = required is not None and required in asked
    refusal: str | None = None
    with _capture_fd2() as lines:
        sess = None
        if strict:
            # onnxruntime refuses the option when the CPU provider is listed explicitly
            so_strict = _session_options(ort, threads, spinning, {**(options or {}), FALLBACK_OPTION: "1"})
            try:
                sess = ort.InferenceSession(src, so_strict, providers=[p for p in asked if p != "CPUExecutionProvider"])
            except Exception as exc:
                refusal = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
                asked = ["CPUExecutionProvider"]
        if sess is None:
            try:
                sess = ort.InferenceSession(src, so, providers=asked)
            except Exception as exc:
                msg = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
                raise ModelLoadError(f"onnxruntime cannot load the ONNX model: {msg}; check the opset (--opset) and "
                                     "that the file is a complete export") from exc
    for ln in lines:
        log.debug("onnxruntime: %s", ln)
    used = list(sess.get_providers())
    if refusal is not None and required is not None:
        started = _fallback_reason(required, lines)
        if started.endswith("(it printed no reason)"):
            started = ""
        if started:  # the provider itself did not start: every node would have fallen back
            why = f"{started} (with CPU fallback disabled, onnxruntime refused to run the model on the CPU instead)"
        elif "assigned to the default CPU EP" in refusal:
            placed = _cpu_nodes(ort, src, threads, spinning, options, required)
            which = f": {placed}" if placed else ""
            why = (f"{required} started, but onnxruntime would still run some nodes on the CPU{which}; the CPU "
                   f"fallback is disabled so that every node runs on {short_provider(required)} (onnxruntime: "
                   f"{refusal})")
        else:
            why = f"with CPU fallback disabled onnxruntime refused the session: {refusal}"
        _LAST_REASON[required] = why
        not_started[required] = why
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
                      input_types=[i.type for i in inputs], cuda_libraries=cuda_note,
                      fallback_disabled=strict and refusal is None)

