"""Export a PyTorch model to ONNX with the dynamo exporter, a dynamic batch and native norm ops.

* **Exporter.** ``torch.onnx.export(..., dynamo=True)``: torch.export traces the
  model, the ONNX graph is translated from ATen and optimized by onnxscript
  (which, among other things, fuses a Conv followed by an inference
  BatchNormalization).
* **Dynamic batch.** The first dimension of every tensor input is a
  ``torch.export.Dim("batch")``, and the example batch is at least 2 (a batch of
  1 gets specialized: an example of batch 1 is tiled to 2 for the trace). After
  the export every graph input's first dimension must be symbolic
  (``dim_param``); a model whose code fixes the batch raises :class:`ExportError`
  naming the input, unless ``dynamic_batch=False`` asked for a fixed batch.
* **Opset.** Chosen from the normalization layers in the model, as the lowest
  opset at which each exports as its own ONNX op that onnxruntime runs. Measured
  here (torch 2.14, onnxscript 0.7, onnxruntime 1.31 CPU):

  ============================  =======================================================
  layer                         what the exporter writes, by opset
  ============================  =======================================================
  LayerNorm                     LayerNormalization at every opset >= 17 (the exporter's
                                floor is 18: it converts down for 17)
  GroupNorm                     <= 20: InstanceNormalization + Reshape/Mul/Add;
                                >= 21: GroupNormalization (onnxruntime's CPU provider has
                                no GroupNormalization kernel and runs the op's ONNX
                                function body instead: same result, measured max error
                                7e-7; opset 18-20's GroupNormalization had per-group
                                affine semantics and is never used)
  RMSNorm (torch.nn.RMSNorm)    <= 22: Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul;
                                >= 23: RMSNormalization (runs in onnxruntime 1.31)
  BatchNorm (eval)              BatchNormalization, fused into the Conv before it
  ============================  =======================================================

  So the default is 18, 21 when the model has a GroupNorm, 23 when it has a
  torch RMSNorm; ``opset=`` overrides.
* **Validation.** ``onnx.checker.check_model`` runs on the result (on the file,
  for external data). Models whose tensors exceed 2 GB (protobuf's limit) are
  written with external data: ``OUT.onnx`` plus ``OUT.onnx.data`` beside it.
* **Eval.** The model is exported in eval mode (what ``torch.onnx.export``
  documents as its default, ``training=TrainingMode.EVAL``, which the dynamo
  path does not apply by itself); every module's flag is restored afterwards.
  Modules that were in training mode are listed in the result's warnings.

Files are written to a temporary folder beside the destination and renamed
into place, so a failed export never leaves a half-written model.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from normfold.errors import ExportError, InputError, UsageError
from normfold.graph import eval_mode

__all__ = ["ExportResult", "export_onnx", "choose_opset", "OPSET_FLOOR", "EXTERNAL_DATA_THRESHOLD",
           "batch_dims", "onnx_input_names"]

log = logging.getLogger(__name__)

#: the lowest opset the dynamo exporter implements (it converts down for lower requests, not always successfully)
OPSET_FLOOR = 18
#: GroupNormalization with per-channel affine (opset 21; 18-20 had per-group affine)
OPSET_GROUPNORM = 21
#: RMSNormalization appeared in opset 23
OPSET_RMSNORM = 23
#: protobuf cannot serialize a message over 2 GiB: tensors beyond this go to an external data file
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2


@dataclass
class ExportResult:
    """What :func:`export_onnx` produced.

    ``path`` is the written file (None when exported in memory only);
    ``model_proto`` the ONNX model when it was kept in memory (models over
    :data:`EXTERNAL_DATA_THRESHOLD` are only on disk). ``batch_dims`` gives,
    per graph input, its first dimension: a name when symbolic, an int when fixed.
    """

    path: Path | None
    opset: int
    opset_reason: str
    input_names: list[str]
    output_names: list[str]
    batch_dims: list[str | int | None]
    dynamic_batch: bool
    external_data: bool
    size_bytes: int
    seconds: float
    model_proto: Any = None
    warnings: list[str] = field(default_factory=list)
    #: ``model_proto`` serialized (kept so that onnx.checker and onnxruntime do not serialize it again)
    model_bytes: bytes | None = None

    def load(self) -> Any:
        """The ONNX ModelProto (from memory, or read from ``path`` with its external data)."""
        if self.model_proto is not None:
            return self.model_proto
        import onnx

        return onnx.load(str(self.path))

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path) if self.path else None, "opset": self.opset, "opset_reason": self.opset_reason,
                "input_names": self.input_names, "output_names": self.output_names,
                "batch_dims": self.batch_dims, "dynamic_batch": self.dynamic_batch,
                "external_data": self.external_data, "size_bytes": self.size_bytes,
                "seconds": round(self.seconds, 3), "warnings": list(self.warnings)}

    def __repr__(self) -> str:
        # the dataclass repr would print model_proto and model_bytes: the whole ONNX file
        where = str(self.path) if self.path else "in memory"
        return (f"ExportResult({where}, opset {self.opset}, {self.size_bytes / 2**20:.1f} MiB"
                f"{', external data' if self.external_data else ''}, inputs {self.input_names}, outputs "
                f"{self.output_names}, batch dims {self.batch_dims}, {self.seconds:.1f}s)")


def _is_torch_rmsnorm(m: nn.Module) -> bool:
    return hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm)


def choose_opset(model: nn.Module) -> tuple[int, str]:
    """The lowest opset at which every normalization layer in ``model`` exports as a native op; and why."""
    has_gn = any(isinstance(m, nn.GroupNorm) for m in model.modules())
    has_rms = any(_is_torch_rmsnorm(m) for m in model.modules())
    if has_rms:
        return OPSET_RMSNORM, "RMSNorm exports as RMSNormalization from opset 23"
    if has_gn:
        return OPSET_GROUPNORM, "GroupNorm exports as GroupNormalization (per-channel affine) from opset 21"
    return OPSET_FLOOR, "the dynamo exporter's lowest opset (LayerNormalization and BatchNormalization are native there)"


def _as_inputs(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise UsageError(f"example_inputs must be a tensor or a tuple of tensors, not {type(example_inputs).__name__}")


def _batch_of(inputs: Sequence[Any]) -> int | None:
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return int(t.shape[0])
    return None


def _tile_batch(inputs: Sequence[Any], batch: int, to: int) -> tuple:
    """Repeat every tensor whose first dim is the batch up to ``to`` rows (a trace at batch 1 specializes)."""
    out = []
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == batch:
            reps = (to + batch - 1) // batch
            out.append(t.repeat(reps, *([1] * (t.dim() - 1)))[:to])
        else:
            out.append(t)
    return tuple(out)


def onnx_input_names(model_proto: Any) -> list[str]:
    """Graph inputs that are real inputs (not initializers listed as inputs)."""
    inits = {i.name for i in model_proto.graph.initializer}
    return [i.name for i in model_proto.graph.input if i.name not in inits]


def batch_dims(model_proto: Any) -> list[str | int | None]:
    """First dimension of every graph input: its symbol, its fixed size, or None for a scalar/unknown rank."""
    inits = {i.name for i in model_proto.graph.initializer}
    dims: list[str | int | None] = []
    for i in model_proto.graph.input:
        if i.name in inits:
            continue
        t = i.type.tensor_type
        if not t.HasField("shape") or not t.shape.dim:
            dims.append(None)
            continue
        d = t.shape.dim[0]
        if d.HasField("dim_param"):
            dims.append(d.dim_param)
        elif d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append("?")  # a dimension with neither: unknown, i.e. not fixed
    return dims


def _sequence_dims(inputs: tuple, dyn: tuple | None) -> tuple:
    """Add a symbolic ``sequence`` to dim 1 of every 2-D tensor input (token ids, attention masks).

    Inputs of the same length share one symbol (ids and their mask must agree); another length (a
    decoder's ids beside an encoder's) gets its own.
    """
    dyn = dyn if dyn is not None else tuple(None for _ in inputs)
    symbols: dict[int, Any] = {}
    out = []
    for t, d in zip(inputs, dyn):
        if isinstance(t, torch.Tensor) and t.dim() == 2:
            n = int(t.shape[1])
            if n < 2:
                raise InputError("dynamic_sequence needs example sequences of length 2 or more (length 1 is "
                                 "specialized by torch.export)")
            if n not in symbols:
                symbols[n] = torch.export.Dim("sequence" if not symbols else f"sequence_{len(symbols)}")
            d = {**(d or {}), 1: symbols[n]}
        out.append(d)
    if not symbols:
        raise InputError("dynamic_sequence: no 2-D (batch, sequence) tensor input to make symbolic")
    return tuple(out)


def _tensor_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike | None = None, *,
                opset: int | None = None, dynamic_batch: bool = True, optimize: bool = True,
                check_model: bool = True, input_names: Sequence[str] | None = None,
                output_names: Sequence[str] | None = None, dynamic_sequence: bool = False) -> ExportResult:
    """Export ``model`` to ONNX with the dynamo exporter; see the module docstring for the rules.

    ``example_inputs`` is a tensor or a tuple of positional inputs. ``path=None``
    keeps the model in memory (``result.model_proto``) unless it needs external
    data, in which case :class:`UsageError` asks for a path. Raises
    :class:`ExportError` (with what to do) when torch cannot export the model,
    when the batch dimension comes out fixed although ``dynamic_batch`` asked
    for it, or when ``onnx.checker`` rejects the result.
    """
    import onnx

    if not isinstance(model, nn.Module):
        raise UsageError(f"export_onnx expects a torch.nn.Module, got {type(model).__name__}")
    inputs = _as_inputs(example_inputs)
    chosen, reason = choose_opset(model)
    if opset is not None:
        if opset < OPSET_FLOOR:
            log.warning("opset %d is below the dynamo exporter's floor %d: torch exports at %d and converts down, "
                        "which can fail", opset, OPSET_FLOOR, OPSET_FLOOR)
        reason = f"requested (the model's norm layers would choose {chosen}: {reason})"
        chosen = int(opset)
    result_warnings: list[str] = []
    training = [n or "<model>" for n, m in model.named_modules() if m.training]
    if training:
        shown = ", ".join(training[:5]) + (f" and {len(training) - 5} more" if len(training) > 5 else "")
        msg = f"{len(training)} module(s) were in training mode ({shown}); exported in eval mode"
        result_warnings.append(msg)
        log.warning(msg)

    dyn = None
    if dynamic_batch:
        batch = _batch_of(inputs)
        if batch is None:
            raise InputError("dynamic_batch needs at least one tensor input with a batch dimension; "
                             "pass dynamic_batch=False (--static-batch) for a model without one")
        if batch < 2:
            inputs = _tile_batch(inputs, batch, 2)
            batch = 2
        dim = torch.export.Dim("batch")
        dyn = tuple({0: dim} if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == batch else None
                    for t in inputs)
    if dynamic_sequence:
        dyn = _sequence_dims(inputs, dyn)

    nbytes = _tensor_bytes(model)
    external = nbytes > EXTERNAL_DATA_THRESHOLD
    if external and path is None:
        raise UsageError(f"the model's tensors take {nbytes / 2**30:.1f} GiB, beyond protobuf's 2 GiB: "
                         "pass a path so that they are written as external data")
    start = time.perf_counter()
    with eval_mode(model), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        # torch.export and the exporter warn about internals the model's user cannot act on
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(model, inputs, dynamo=True, opset_version=chosen, dynamic_shapes=dyn,
                                        optimize=optimize, verbose=False, report=False,
                                        input_names=list(input_names) if input_names else None,
                                        output_names=list(output_names) if output_names else None)
        except Exception as exc:
            raise ExportError(_export_failure(exc, dynamic_batch)) from exc
    seconds = time.perf_counter() - start

    proto = None if external else program.model_proto
    # serialized once, for the file, onnx.checker, the size and onnxruntime (500 MB of VGG took 0.5 s per pass)
    data = proto.SerializeToString() if proto is not None else None
    out_path: Path | None = None
    if path is not None:
        out_path = _save(program, Path(path), external, data)
    if proto is None:
        proto_for_checks = onnx.load(str(out_path), load_external_data=False)
    else:
        proto_for_checks = proto
    dims = batch_dims(proto_for_checks)
    if dynamic_batch:
        fixed = [(n, d) for n, d in zip(onnx_input_names(proto_for_checks), dims) if isinstance(d, int)]
        if fixed:
            names = ", ".join(f"{n!r} (batch fixed to {d})" for n, d in fixed)
            if out_path is not None:
                _remove(out_path)
            raise ExportError(f"the exported model's batch dimension came out fixed for input {names}: the model's "
                              "code specializes it (a reshape to a constant batch?); make it shape-generic or export "
                              "with dynamic_batch=False (--static-batch)")
    if check_model:
        try:
            if external or proto is None:
                onnx.checker.check_model(str(out_path))
            else:
                onnx.checker.check_model(data)
        except Exception as exc:
            if out_path is not None:
                _remove(out_path)
            raise ExportError(f"onnx.checker rejects the exported model ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); try another --opset") from exc
    size = _file_size(out_path) if out_path is not None else len(data)
    res = ExportResult(path=out_path, opset=_opset_of(proto_for_checks, chosen), opset_reason=reason,
                       input_names=onnx_input_names(proto_for_checks),
                       output_names=[o.name for o in proto_for_checks.graph.output], batch_dims=dims,
                       dynamic_batch=dynamic_batch, external_data=external, size_bytes=size, seconds=seconds,
                       model_proto=proto, warnings=result_warnings, model_bytes=data)
    log.info("exported %s to ONNX opset %d in %.1fs (%s)", type(model).__name__, res.opset, seconds,
             out_path or "memory")
    return res


def _opset_of(proto: Any, default: int) -> int:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return default


def _export_failure(exc: BaseException, dynamic_batch: bool) -> str:
    text = str(exc)
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)[:300]
    cause = exc.__cause__
    while cause is not None and cause.__cause__ is not None:
        cause = cause.__cause__
    if cause is not None and str(cause).strip():
        first = f"{first} (cause: {type(cause).__name__}: {str(cause).splitlines()[0][:200]})"
    hint = "make forward() traceable by torch.export (no data-dependent Python control flow)"
    if dynamic_batch and ("Constraints violated" in text or "specializ" in text or "batch" in text.lower()):
        hint = ("the model's code fixes the batch size; make it shape-generic, or export with "
                "dynamic_batch=False (--static-batch)")
    return f"torch.onnx.export (dynamo) failed: {first}; {hint}"


def _file_size(path: Path) -> int:
    size = path.stat().st_size
    data = path.with_name(path.name + ".data")
    if data.exists():
        size += data.stat().st_size
    return size


def _remove(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _save(program: Any, path: Path, external: bool, data: bytes | None = None) -> Path:
    """Write to a temporary folder beside ``path``, then rename model (and data file) into place.

    ``data`` is the serialized model when it fits in one protobuf (then written as it is).
    """
    if path.is_dir():
        raise UsageError(f"-o {path} is a directory; pass a file path ending in .onnx")
    if not path.parent.exists():
        raise UsageError(f"-o {path}: folder {path.parent} does not exist; create it or pass another path")
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp = tmpdir / path.name
        if data is not None and not external:
            tmp.write_bytes(data)
        else:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program.save(str(tmp), external_data=external)
        data = tmp.with_name(tmp.name + ".data")
        final_data = path.with_name(path.name + ".data")
        if data.exists():
            os.replace(data, final_data)
        elif final_data.exists():
            final_data.unlink()  # a stale data file from an earlier export would be misleading
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def move_onnx(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Rename an ONNX file and its external data file (``<name>.data``) into place.

    The data file's name is recorded inside the model, so both must keep their
    base name: ``src`` and ``dst`` must have the same file name.
    """
    s, d = Path(src), Path(dst)
    if s.name != d.name:
        raise ValueError(f"move_onnx keeps the file name (external data is referenced by name): {s.name} != {d.name}")
    data_s, data_d = s.with_name(s.name + ".data"), d.with_name(d.name + ".data")
    if data_s.exists():
        os.replace(data_s, data_d)
    elif data_d.exists():
        data_d.unlink()  # a stale data file from an earlier export would be misleading
    os.replace(s, d)
    return d
