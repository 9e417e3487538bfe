"""``normfold.check``: prove that what will ship computes what the trained model computes in eval.

Stages, in order (docs/architecture.md, "Checker semantics"):

1. ``original``: a deep copy of the reference model forced to eval, in PyTorch
   (its modules are copied; its weights are the original's tensors, read only).
2. ``candidate``: the transformed model, in PyTorch, run as it is (on a copy,
   so a module left in training mode shows its effect without touching the
   caller's model).
3. ``onnx``: the ONNX model in onnxruntime: the file given, or the candidate
   (the original when there is no candidate) exported by
   :func:`normfold.export.export_onnx`.

Each stage's outputs are compared with the original's; the ONNX outputs also
with the candidate's. A mismatch is blamed on the first stage whose outputs
differ from the original's, and, when ``localize`` is on, the first layer
where that stage diverges from the one before it is named
(:mod:`normfold.check.localize`). The probes of :mod:`normfold.check.probes`
run on the stages they apply to. Every check becomes one
:class:`~normfold.check.report.CheckResult`.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from normfold.check import localize as loc
from normfold.check.localize import preserved_buffers
from normfold.check.compare import OutputComparison, compare_flat, flatten_outputs, name_outputs
from normfold.check.inputs import load_inputs
from normfold.check.probes import (DEFAULT_BATCH_SIZES, BatchIndependence, Finding, batch_dim_findings,
                                   batch_independence, norm_op_lint, onnx_training_findings, training_modules)
from normfold.check.report import FAILED, PASSED, SKIPPED, CheckReport, CheckResult, StageInfo, environment
from normfold.check.runtime import OrtRuntime, create_session, resolve_providers, short_provider
from normfold.errors import ExportError, InputError, ModelLoadError, UsageError
from normfold.inputs import INPUT_MEAN, INPUT_STD, infer_input_shapes, model_dtype_device, random_inputs
from normfold.tolerances import LOCALIZE, Tolerance, policy, resolve_tolerance

__all__ = ["check"]

log = logging.getLogger(__name__)


def _resolve_inputs(reference: nn.Module, inputs: Any, input_shapes: Sequence[Sequence[int]] | None,
                    seed: int) -> tuple[tuple[torch.Tensor, ...], str]:
    dtype, device = model_dtype_device(reference)
    if inputs is not None:
        if isinstance(inputs, (str, os.PathLike)):
            return load_inputs(inputs), f"file {inputs}"
        if isinstance(inputs, torch.Tensor):
            return (inputs,), "given tensors"
        if isinstance(inputs, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in inputs) and inputs:
            return tuple(inputs), "given tensors"
        raise UsageError("inputs must be a tensor, a tuple of tensors, or a path to a .pt/.npy/.npz file")
    source = f"random N({INPUT_MEAN:g}, {INPUT_STD:g}^2)"
    if input_shapes:
        shapes = [tuple(int(s) for s in shape) for shape in input_shapes]
        return random_inputs(shapes, seed=seed, dtype=dtype, device=device), source
    inferred = infer_input_shapes(reference)
    x = random_inputs(inferred.shapes, seed=seed, dtype=dtype, device=device, integer_high=inferred.integer_high)
    if inferred.integer_high is not None:
        source = f"random token ids in [0, {inferred.integer_high})"
    return x, source + f"; {inferred.reason}"


def _eval_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` forced to eval whose parameters and buffers are the original's tensors.

    The modules (train flags, hooks, attributes) are copied, so forcing eval
    does not touch the caller's model; the tensors are shared, because the
    reference only reads them (in eval nothing updates a buffer) and a second
    copy of a 2.5 GB model's weights would only cost memory.
    """
    memo: dict[int, Any] = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo).eval()


def _describe_inputs(inputs: Sequence[torch.Tensor]) -> list[dict[str, Any]]:
    return [{"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for t in inputs]


def _short_error(exc: BaseException) -> str:
    head = (str(exc).splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {head}" if head else type(exc).__name__


def _run_eager(model: nn.Module, inputs: Sequence[Any]) -> dict[str, torch.Tensor]:
    with torch.no_grad(), preserved_buffers(model):
        return {k: v.detach() for k, v in flatten_outputs(model(*inputs)).items()}


def _summarize(comparisons: Sequence[OutputComparison], against: str) -> str:
    """``2 output(s) match the original: max |a - b| 3.1e-06 <= 2e-05 x scale 4.87 (margin 6.4x)``."""
    bad = [c for c in comparisons if not c.passed]
    if not bad:
        worst = min(comparisons, key=lambda c: c.margin, default=None)
        if worst is None:
            return "no outputs to compare"
        name = f"{worst.name}: " if len(comparisons) > 1 else ""
        return f"{len(comparisons)} output(s) match {against}: {name}{worst.verdict()}"
    first = bad[0]
    return f"{len(bad)} of {len(comparisons)} output(s) differ from {against}: {first.name}: {first.problem}"


def _findings_check(name: str, findings: list[Finding], ok_message: str, seconds: float) -> CheckResult:
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        msg = f"{errors[0]}" + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
        return CheckResult(name, FAILED, msg, seconds, findings=findings)
    warns = [f for f in findings if f.severity == "warning"]
    msg = ok_message + (f" ({len(warns)} warning(s))" if warns else "")
    return CheckResult(name, PASSED, msg, seconds, findings=findings)


def _batch_check(name: str, probe: BatchIndependence, seconds: float, sizes: Sequence[int]) -> CheckResult:
    if probe.passed:
        msg = (f"a sample's outputs are the same alone and in batches of {', '.join(map(str, sizes[1:]))} "
               f"(max abs difference {probe.max_abs:.3g})") if not probe.note.startswith("no input") else probe.note
        return CheckResult(name, PASSED, msg, seconds, batch=probe)
    fails = probe.failures()
    return CheckResult(name, FAILED, f"a sample's output depends on its batch: {fails[0]}", seconds, batch=probe)


def check(reference: nn.Module, *, candidate: nn.Module | None = None, onnx: Any = None, inputs: Any = None,
          providers: Sequence[str] | str = ("cuda", "cpu"), atol: float | None = None, rtol: float | None = None,
          scale_tol: float | None = None, input_shapes: Sequence[Sequence[int]] | None = None, seed: int = 0, require_provider: str | None = None,
          export: bool = True, opset: int | None = None, probes: bool = True,
          batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, localize: bool = True,
          save_onnx: str | os.PathLike | None = None, threads: int | None = None,
          progress: Callable[[str], None] | None = None) -> CheckReport:
    """Check that ``candidate`` and/or ``onnx`` compute what ``reference`` computes in eval.

    Parameters
    ----------
    reference:
        The trained model. A deep copy forced to eval is the reference; the
        model itself is not touched.
    candidate:
        A transformed model (for example ``fold_batchnorm(model).module``), run as it is.
    onnx:
        An ONNX model (path, ``onnx.ModelProto`` or serialized bytes). When
        omitted and ``export`` is true, the candidate (or the reference) is
        exported with :func:`normfold.export.export_onnx`; ``save_onnx`` keeps that file.
    inputs:
        A tensor, a tuple of tensors, or a .pt/.npy/.npz file. When omitted,
        seeded random inputs of ``input_shapes`` (inferred from the first layer
        when omitted too) drawn from ``N(0.5, 2^2)``.
    providers:
        onnxruntime providers in order of preference (``"cuda"``, ``"cpu"``, full names).
        The one that actually ran is in the report.
    require_provider:
        Fail the ``provider`` check unless this provider (``"cuda"``) actually ran.
    atol, rtol, scale_tol:
        Pass when ``|a - b| <= atol + rtol * |ref| + scale_tol * max|ref|``
        elementwise (``max|ref|`` over the whole output). When none is given:
        normfold's one policy (:data:`normfold.tolerances.POLICY`, the rule of
        :func:`normfold.verify`), for each output the measured ``scale_tol`` of
        its comparison dtype (the lower precision of the two sides); when any
        is given, the others are 0.
    probes:
        Run batch independence, training-mode, batch-dimension and norm-op checks.
    batch_sizes:
        Batch sizes of the batch-independence probe (the first is the sample alone).
    localize:
        On a mismatch, name the first diverging layer.
    threads:
        onnxruntime intra-op threads (default: onnxruntime's, one per core).
    progress:
        Called with a short message as each stage starts (the CLI shows it).

    Returns a :class:`CheckReport`; ``report.passed`` says whether every check
    passed. Raises :class:`NormfoldError` subclasses for unusable arguments
    (inputs that do not fit the reference, a missing ONNX file).
    """
    t_start = time.perf_counter()
    if not isinstance(reference, nn.Module):
        raise UsageError(f"reference must be a torch.nn.Module, got {type(reference).__name__}")
    if candidate is not None and not isinstance(candidate, nn.Module):
        raise UsageError(f"candidate must be a torch.nn.Module, got {type(candidate).__name__}; pass an ONNX model "
                         "as onnx=")
    requested = resolve_providers(providers)
    if require_provider is not None:
        resolve_providers([require_provider])  # a typo is a usage error, before any work
    ref = _eval_copy(reference)
    x, input_source = _resolve_inputs(ref, inputs, input_shapes, seed)
    dtype, _ = model_dtype_device(ref)
    # None: every output is held to the policy of its comparison dtype (normfold.verify's one rule); numbers given
    # replace it. ``tol`` is what the report states: the explicit rule, or the policy of the reference's dtype.
    explicit = resolve_tolerance(atol=atol, rtol=rtol, scale_tol=scale_tol)
    run = _Run(ref=ref, x=x, explicit=explicit, tol=explicit if explicit is not None else policy(dtype), seed=seed,
               sizes=sorted({int(b) for b in batch_sizes if int(b) >= 1}) or list(DEFAULT_BATCH_SIZES),
               probes=probes, requested=requested, threads=threads,
               say=progress or (lambda msg: log.info(msg)))

    _stage_original(run)
    _stage_candidate(run, candidate)
    if probes:
        _eager_probes(run, reference, candidate)
    try:
        _stage_onnx(run, onnx=onnx, export=export, opset=opset, save_onnx=save_onnx,
                    require_provider=require_provider, candidate=candidate)
        _blame(run, localize=localize)
    finally:
        if run.tmpdir is not None:
            shutil.rmtree(run.tmpdir, ignore_errors=True)
    return _report(run, input_source, time.perf_counter() - t_start)


@dataclass
class _Run:
    """What the stages of one :func:`check` share: the inputs and rule, and what each stage found."""

    ref: nn.Module
    x: tuple[torch.Tensor, ...]
    explicit: Tolerance | None
    tol: Tolerance
    seed: int
    sizes: list[int]
    probes: bool
    requested: list[str]
    threads: int | None
    say: Callable[[str], None]
    checks: list[CheckResult] = field(default_factory=list)
    stages: list[StageInfo] = field(default_factory=list)
    ref_out: dict[str, torch.Tensor] = field(default_factory=dict)
    cand_model: nn.Module | None = None
    cand_out: dict[str, torch.Tensor] | None = None
    cand_failed: bool = False
    proto: Any = None
    onnx_info: dict[str, Any] = field(default_factory=dict)
    runtime: OrtRuntime | None = None
    onnx_out: dict[str, torch.Tensor] | None = None
    onnx_failed: bool = False
    tmpdir: str | None = None
    blamed: str | None = None
    divergence: Any = None

    @property
    def exported_from(self) -> nn.Module:
        """The model the ONNX stage exports (and localizes against): the candidate, else the original."""
        return self.cand_model if self.cand_model is not None else self.ref


def _stage_original(run: _Run) -> None:
    """Stage 1: the original, a deep copy in eval; inputs that do not fit it are unusable input."""
    run.say("running the original model (eval)")
    t0 = time.perf_counter()
    try:
        run.ref_out = _run_eager(run.ref, run.x)
    except Exception as exc:
        raise InputError(f"the inputs do not fit the reference model ({_short_error(exc)}); pass inputs of the "
                         "shape its forward() expects (--input-shape or --inputs)") from exc
    if not run.ref_out:
        raise InputError("the reference model returned no tensor; normfold compares tensor outputs")
    run.stages.append(StageInfo("original", "reference model, deep copy in eval mode, PyTorch", True,
                                time.perf_counter() - t0))


def _stage_candidate(run: _Run, candidate: nn.Module | None) -> None:
    """Stage 2: the candidate, as it is (training flags included), compared with the original."""
    if candidate is None:
        run.stages.append(StageInfo("candidate", "no candidate model given", False))
        run.checks.append(CheckResult("outputs[candidate]", SKIPPED, "no candidate model given"))
        return
    run.say("running the candidate model")
    # as it is, training flags included; preserved_buffers puts back any running statistics a forward in
    # training mode updates, so the caller's model is not changed (and no second copy of it is made)
    run.cand_model = candidate
    t0 = time.perf_counter()
    err = None
    try:
        run.cand_out = _run_eager(candidate, run.x)
    except Exception as exc:
        err = _short_error(exc)
    secs = time.perf_counter() - t0
    run.stages.append(StageInfo("candidate", "transformed model, as given, PyTorch", True, secs, err))
    if err is not None:
        run.checks.append(CheckResult("outputs[candidate]", FAILED, f"the candidate's forward raised {err}", secs))
        run.cand_failed = True
        return
    cs = compare_flat(run.ref_out, run.cand_out, run.explicit)
    run.cand_failed = not all(c.passed for c in cs)
    run.checks.append(CheckResult("outputs[candidate]", FAILED if run.cand_failed else PASSED,
                                  _summarize(cs, "the original"), secs, comparisons=cs))


def _eager_probes(run: _Run, reference: nn.Module, candidate: nn.Module | None) -> None:
    """Training-mode modules and batch independence in PyTorch: on the candidate, or the reference without one."""
    t0 = time.perf_counter()
    if run.cand_model is not None:
        findings = training_modules(candidate)
        run.checks.append(_findings_check("training_mode[eager]", findings, "no module of the candidate is in "
                                          "training mode", time.perf_counter() - t0))
    else:
        orig_training = training_modules(reference)
        note = [Finding("warning", "the original model was in training mode; the reference is its eval copy",
                        "original")] if orig_training else []
        run.checks.append(CheckResult("training_mode[eager]", SKIPPED, "no candidate: the reference is the original "
                                      "forced to eval", 0.0, findings=note))
    run.say("batch independence (eager)")
    t0 = time.perf_counter()
    eager_model = run.exported_from
    probe = batch_independence(lambda feed: _run_eager(eager_model, feed), run.x, seed=run.seed, tol=run.explicit,
                               batch_sizes=run.sizes, known=run.cand_out if run.cand_model is not None else run.ref_out)
    run.checks.append(_batch_check("batch_independence[eager]", probe, time.perf_counter() - t0, run.sizes))


def _export_for_check(run: _Run, opset: int | None, save_onnx: str | os.PathLike | None) -> Any:
    """Export the candidate (or the original) for the ONNX stage; the ``export`` check. Returns what onnxruntime
    loads, or None when the export failed (the failure is a check, an interruption is not)."""
    run.say("exporting to ONNX (torch.onnx.export, dynamo)")
    from normfold.export import EXTERNAL_DATA_THRESHOLD, _tensor_bytes, export_onnx

    path = None
    if save_onnx is not None:
        path = Path(save_onnx)
    elif _tensor_bytes(run.exported_from) > EXTERNAL_DATA_THRESHOLD:
        run.tmpdir = tempfile.mkdtemp(prefix="normfold-check-")
        path = Path(run.tmpdir) / "model.onnx"
    t0 = time.perf_counter()
    try:
        res = export_onnx(run.exported_from, run.x, path, opset=opset)
    except ExportError as exc:
        from normfold.pipeline import interrupted_by

        if interrupted_by(exc):  # Ctrl-C is the user stopping the check, not a failed export
            raise KeyboardInterrupt from exc
        run.checks.append(CheckResult("export", FAILED, str(exc), time.perf_counter() - t0))
        return None
    run.checks.append(CheckResult("export", PASSED, f"exported at opset {res.opset} ({res.opset_reason}) in "
                                  f"{res.seconds:.1f}s; onnx.checker passed", time.perf_counter() - t0,
                                  findings=[Finding("warning", w, "export") for w in res.warnings]))
    run.onnx_info.update(res.to_dict())
    run.onnx_info["export_seconds"] = res.seconds
    run.onnx_info["source"] = "exported from the candidate" if run.cand_model is not None else \
        "exported from the original"
    run.proto = res.model_proto if res.model_proto is not None else _load_graph(res.path)
    return res.model_bytes if res.model_bytes is not None else str(res.path)


def _stage_onnx(run: _Run, *, onnx: Any, export: bool, opset: int | None, save_onnx: str | os.PathLike | None,
                require_provider: str | None, candidate: nn.Module | None) -> None:
    """Stage 3: the ONNX model (given, or exported here) in onnxruntime, compared with the original and the
    candidate; the provider check and the ONNX probes."""
    src: Any = None
    skip_reason: str | None = None
    if onnx is not None:
        src, run.proto = _load_onnx(onnx)
        run.onnx_info["path"] = str(onnx) if isinstance(onnx, (str, os.PathLike)) else None
        run.onnx_info["source"] = "given"
    elif export:
        src = _export_for_check(run, opset, save_onnx)
        if src is None:
            skip_reason = "the export failed"
    else:
        skip_reason = "no ONNX model given (and export=False)"

    if src is None:
        reason = skip_reason or "no ONNX model"
        run.stages.append(StageInfo("onnx", reason, False))
        run.checks.append(CheckResult("provider", SKIPPED, f"onnxruntime not run: {reason}"))
        run.checks.append(CheckResult("outputs[onnx]", SKIPPED, reason))
        if run.probes:
            for name in ("training_mode[onnx]", "dynamic_batch[onnx]", "norm_lint[onnx]", "batch_independence[onnx]"):
                run.checks.append(CheckResult(name, SKIPPED, reason))
        return

    from normfold.check.probes import onnx_opset
    from normfold.export import batch_dims

    run.onnx_info.setdefault("opset", onnx_opset(run.proto))
    run.onnx_info.setdefault("batch_dims", batch_dims(run.proto))
    run.say("starting onnxruntime")
    t0 = time.perf_counter()
    try:
        run.runtime = create_session(src, run.requested, threads=run.threads, require=require_provider)
    except ModelLoadError as exc:
        if onnx is not None and isinstance(onnx, (str, os.PathLike)) and not Path(onnx).exists():
            raise
        secs = time.perf_counter() - t0
        run.stages.append(StageInfo("onnx", "ONNX model in onnxruntime", False, secs, str(exc)))
        run.checks.append(CheckResult("outputs[onnx]", FAILED, str(exc), secs))
        run.onnx_failed = True
    if run.runtime is not None:
        _run_onnx(run, require_provider, t0)
    if run.probes:
        _onnx_probes(run.checks, run.proto, run.runtime, run.x, run.seed, run.explicit, run.sizes, candidate, run.say,
                     run.onnx_out)


def _run_onnx(run: _Run, require_provider: str | None, t0: float) -> None:
    """Run the session on the inputs and compare its outputs with the original's (and the candidate's)."""
    runtime = run.runtime
    assert runtime is not None
    run.checks.append(_provider_check(runtime, require_provider))
    run.say("running the ONNX model")
    err = None
    try:
        outs = runtime.run(run.x)
        run.onnx_out = name_outputs(list(run.ref_out), outs)
    except Exception as exc:
        err = _short_error(exc)
    secs = time.perf_counter() - t0
    run.stages.append(StageInfo("onnx", f"ONNX model in onnxruntime on {runtime.provider}", True, secs, err))
    if err is not None:
        run.checks.append(CheckResult("outputs[onnx]", FAILED, f"onnxruntime could not run the inputs: {err}", secs))
        run.onnx_failed = True
        return
    cs = compare_flat(run.ref_out, run.onnx_out, run.explicit)
    run.onnx_failed = not all(c.passed for c in cs)
    details: dict[str, Any] = {}
    msg = _summarize(cs, "the original")
    if run.cand_out is not None:
        vs_cand = compare_flat(run.cand_out, run.onnx_out, run.explicit)
        details["vs_candidate"] = [c.to_dict() for c in vs_cand]
        same = all(c.passed for c in vs_cand)
        msg += "; " + ("matches the candidate" if same else "differs from the candidate too")
    run.checks.append(CheckResult("outputs[onnx]", FAILED if run.onnx_failed else PASSED, msg, secs,
                                  comparisons=cs, details=details))


def _blame(run: _Run, *, localize: bool) -> None:
    """Blame the first stage whose outputs differ from the original's and, with ``localize``, name the first
    layer where it diverges from the stage before it (a diagnosis: it never changes the verdict)."""
    run.blamed = "candidate" if run.cand_failed else "onnx" if run.onnx_failed else None
    if not run.blamed or not localize:
        return
    run.say(f"localizing the mismatch in stage {run.blamed}")
    try:
        run.divergence = _localize(run.blamed, run.ref, run.cand_model, run.exported_from, run.proto, run.x,
                                   run.requested, run.threads, run.tol.scaled or LOCALIZE)
    except Exception as exc:  # localization is a diagnosis: it must never hide the verdict
        log.warning("could not localize the mismatch: %s", _short_error(exc))
    if run.divergence is not None:
        for c in run.checks:
            if c.name == f"outputs[{run.blamed}]" and c.status == FAILED:
                c.message += f"; {run.divergence.describe()}"
                c.details["divergence"] = run.divergence.to_dict()


def _report(run: _Run, input_source: str, seconds: float) -> CheckReport:
    order = {"provider": 0, "export": 1, "outputs[candidate]": 2, "outputs[onnx]": 3}
    run.checks.sort(key=lambda c: order.get(c.name, 10))
    runtime, tol = run.runtime, run.tol
    report = CheckReport(
        checks=run.checks, stages=run.stages, seed=run.seed, inputs=_describe_inputs(run.x), input_source=input_source,
        atol=tol.atol, rtol=tol.rtol, scale_tol=tol.scaled, provider=runtime.provider if runtime is not None else None,
        provider_note=runtime.describe() if runtime is not None else "", providers_requested=run.requested,
        blamed_stage=run.blamed, divergence=run.divergence,
        onnx={k: v for k, v in run.onnx_info.items() if k != "warnings"}, environment=environment(), seconds=seconds)
    log.info(report.final_line())
    return report


def _provider_check(runtime: OrtRuntime, require: str | None) -> CheckResult:
    used = runtime.provider
    if require is None:
        return CheckResult("provider", PASSED, runtime.describe())
    want = resolve_providers([require])[0]
    if used == want:
        return CheckResult("provider", PASSED, runtime.describe() + f"; {short_provider(want)} was required")
    why = runtime.not_started.get(want, f"{want} was not in the requested providers")
    return CheckResult("provider", FAILED, f"{short_provider(want)} was required but onnxruntime ran on {used}: {why}",
                       details={"required": want, "used": runtime.used})


def _load_onnx(onnx_arg: Any) -> tuple[Any, Any]:
    """(what onnxruntime loads, the graph for the probes) from a path, a ModelProto or bytes."""
    import onnx as onnx_lib

    if hasattr(onnx_arg, "SerializeToString"):
        return onnx_arg, onnx_arg
    if isinstance(onnx_arg, (bytes, bytearray)):
        return bytes(onnx_arg), onnx_lib.load_from_string(bytes(onnx_arg))
    if isinstance(onnx_arg, (str, os.PathLike)):
        p = Path(onnx_arg)
        if not p.exists():
            raise ModelLoadError(f"{p}: no such ONNX file; check the path")
        return str(p), _load_graph(p)
    raise UsageError(f"onnx must be a path, an onnx.ModelProto or bytes, not {type(onnx_arg).__name__}")


def _load_graph(path: Path | str | None) -> Any:
    import onnx as onnx_lib

    try:
        return onnx_lib.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a readable ONNX file ({_short_error(exc)}); re-export it") from exc


def _onnx_probes(checks: list[CheckResult], proto: Any, runtime: OrtRuntime | None, x: Sequence[torch.Tensor],
                 seed: int, tol: Tolerance | None, sizes: Sequence[int], candidate: nn.Module | None,
                 say: Callable[[str], None], known: Mapping[str, torch.Tensor] | None) -> None:
    t0 = time.perf_counter()
    checks.append(_findings_check("training_mode[onnx]", onnx_training_findings(proto),
                                  "no training-mode op in the graph (BatchNormalization training_mode=0, no Dropout, "
                                  "no random op)", time.perf_counter() - t0))
    t0 = time.perf_counter()
    checks.append(_findings_check("dynamic_batch[onnx]", batch_dim_findings(proto),
                                  "the batch dimension of every input is symbolic", time.perf_counter() - t0))
    t0 = time.perf_counter()
    checks.append(_findings_check("norm_lint[onnx]", norm_op_lint(proto, candidate),
                                  "normalization ops have the semantics of their opset", time.perf_counter() - t0))
    if runtime is None:
        checks.append(CheckResult("batch_independence[onnx]", SKIPPED, "onnxruntime could not load the model"))
        return
    say("batch independence (onnxruntime)")
    t0 = time.perf_counter()

    def run(feed: tuple) -> dict[str, torch.Tensor]:
        return {f"out.{i}": t for i, t in enumerate(runtime.run(feed))}

    # the main run's outputs are named like the reference's; the probe's runs by position
    reuse = {f"out.{i}": t for i, t in enumerate(known.values())} if known is not None else None
    probe = batch_independence(run, x, seed=seed, tol=tol, batch_sizes=sizes, known=reuse)
    checks.append(_batch_check("batch_independence[onnx]", probe, time.perf_counter() - t0, sizes))


def _localize(blamed: str, ref: nn.Module, cand_model: nn.Module | None, exported_from: nn.Module, proto: Any,
              x: Sequence[torch.Tensor], providers: Sequence[str], threads: int | None,
              threshold: float) -> loc.Divergence | None:
    """Name the first layer of stage ``blamed`` that diverges from the stage before it."""
    rows = tuple(t[:2] if t.dim() >= 1 else t for t in x)  # two samples are enough to see a layer diverge
    if blamed == "candidate" and cand_model is not None:
        order, ref_vals = loc.record(ref, rows)
        _, cand_vals = loc.record(cand_model, rows, as_is=True)
        return _or_gradual(loc.first_divergence(order, ref_vals, loc.checkpoint_modules(ref), cand_vals, threshold),
                           threshold, len(set(cand_vals) & set(ref_vals)))
    if blamed == "onnx" and proto is not None:
        # compare the graph with the model it came from: the candidate (which passed) or the original
        base = exported_from
        order, base_vals = loc.record(base, rows)
        calls: dict[str, int] = {}
        for path, _ in order:
            calls[path] = calls.get(path, 0) + 1
        if any(init.data_location == 1 for init in proto.graph.initializer):
            # the weights live in a data file beside the model: a copy with extra outputs would have to rewrite it
            return loc.Divergence("", "", float("nan"), float("nan"), 0,
                                  note="the model keeps its weights in an external data file (the exporter's default "
                                       "for large models, and some tools' for any size): layer-by-layer comparison "
                                       "is not done for such models")
        onnx_vals = loc.onnx_record(proto, rows, calls, providers, threads)
        if not onnx_vals:
            return loc.Divergence("", "", float("nan"), float("nan"), 0,
                                  note="the ONNX graph's nodes carry no module names to match with the model's layers")
        return _or_gradual(loc.first_divergence(order, base_vals, loc.checkpoint_modules(base), onnx_vals, threshold),
                           threshold, len(onnx_vals))
    return None


def _or_gradual(d: loc.Divergence | None, threshold: float, compared: int) -> loc.Divergence:
    if d is not None:
        return d
    return loc.Divergence("", "", float("nan"), float("nan"), compared,
                          note=f"no single layer's output differs by more than {threshold:g} of its scale among the "
                               f"{compared} compared: the error builds up gradually (rounding, or a change the hooks "
                               "do not see)")
