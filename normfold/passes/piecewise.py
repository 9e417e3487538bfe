"""Apply a pass part by part when the whole model does not trace.

Every graph-based pass needs the model's dataflow. A single data-dependent
``if`` in a model's top-level ``forward`` makes both torch.fx and torch.export
fail (:class:`~normfold.errors.TraceError`), although every block below it
traces. :func:`piecewise` then applies the pass to the largest submodules
that do trace, each with the inputs it really receives:

1. the whole model is tried first; only a :class:`TraceError` leads on;
2. one forward pass on the example inputs (eval, no_grad) records the
   positional inputs of every submodule's first call (forward pre-hooks);
3. each child of a module that did not trace is tried with its recorded
   inputs; a child that does not trace either is split into its own children,
   down to leaves.

Correctness: a pass applied to a submodule rewrites only that submodule, and
every rewrite it makes is exact for *all* inputs of the submodule (the pass
proves it on the submodule's own graph), so the whole model computes what it
computed, whatever the untraced code around the submodule does with it. The
code that does not trace is reported, by module path and with the tracer's
reason, as a :class:`~normfold.passes.base.Skip`; so is a submodule the
forward did not run on the example inputs (its inputs are unknown) and the
norm layers used directly by the untraced code.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from normfold.errors import PassError, TraceError
from normfold.passes.base import Change, PassResult, Skip

__all__ = ["piecewise"]

#: pass signature: pass_fn(module, *, inplace, example_inputs) -> PassResult
PassFn = Callable[..., PassResult]


def _reason(exc: BaseException) -> str:
    head = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    return head[:240]


def _trace_failure(exc: BaseException) -> TraceError | None:
    """The TraceError behind ``exc`` (a pass run by a PassManager re-raises it as a PassError), else None."""
    cur: BaseException | None = exc
    while cur is not None:
        if isinstance(cur, TraceError):
            return cur
        cur = cur.__cause__
    return None


def _record_inputs(model: nn.Module, example_inputs: tuple[Any, ...]) -> dict[str, tuple[Any, ...] | None]:
    """Module path -> positional inputs of its first call (None when called with keyword arguments only)."""
    from normfold.graph import eval_mode

    seen: dict[str, tuple[Any, ...] | None] = {}
    handles = []
    for name, module in model.named_modules():
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str = name) -> None:
            if name not in seen:
                seen[name] = None if kwargs else tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a
                                                       for a in args)
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with eval_mode(model), torch.no_grad():
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _has_targets(module: nn.Module, targets: tuple[type, ...]) -> bool:
    return any(isinstance(m, targets) for m in module.modules())


def _prefixed(path: str, result: PassResult) -> tuple[list[Change], list[Skip]]:
    def p(x: str) -> str:
        return f"{path}.{x}" if x else path

    changes = [Change(c.pass_name, c.action, tuple(p(x) for x in c.paths), f"{path}: {c.message}", c.details)
               for c in result.changes]
    skips = [Skip(s.pass_name, tuple(p(x) for x in s.paths) or (path,), s.reason) for s in result.skipped]
    return changes, skips


def piecewise(pass_fn: PassFn, model: nn.Module, *, example_inputs: Any, inplace: bool = False,
              targets: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm,), pass_name: str | None = None
              ) -> PassResult:
    """Run ``pass_fn`` on ``model``; when the model does not trace whole, on its largest parts that do.

    ``targets`` are the layer types the pass rewrites: parts without one are
    not traced at all, and the ones left inside untraced code are reported.
    ``example_inputs`` (a tensor or tuple) are needed to record each part's
    inputs. Returns one PassResult for the whole model; its ``metrics`` hold
    ``"piecewise"``: the paths of the parts the pass ran on (absent when the
    whole model traced).
    """
    from normfold.passes.base import copy_module

    inputs = example_inputs if isinstance(example_inputs, tuple) else (
        tuple(example_inputs) if isinstance(example_inputs, list) else (example_inputs,))
    try:
        return pass_fn(model, inplace=inplace, example_inputs=inputs)
    except (TraceError, PassError) as exc:
        failure = _trace_failure(exc)
        if failure is None:
            raise
        whole_reason = _reason(failure)
    name = pass_name or getattr(pass_fn, "__name__", "pass")
    work = model if inplace else copy_module(model)
    recorded = _record_inputs(work, inputs)
    total = PassResult(module=work)
    parts: list[str] = []

    def visit(path: str, module: nn.Module, reason: str) -> None:
        # the norm layers this module's own (untraced) forward uses directly
        direct = [f"{path}.{n}" if path else n for n, c in module.named_children() if isinstance(c, targets)]
        if direct:
            total.skipped.append(Skip(name, tuple(direct), f"used by the forward of {path or '<model>'}, which does "
                                                           f"not trace: {reason}"))
        for child_name, child in list(module.named_children()):
            child_path = f"{path}.{child_name}" if path else child_name
            if isinstance(child, targets) or not _has_targets(child, targets):
                continue
            args = recorded.get(child_path, None)
            if child_path not in recorded:
                total.skipped.append(Skip(name, (child_path,), "not run by the model's forward on the example "
                                                               "inputs (its inputs are unknown)"))
                continue
            if args is None:
                total.skipped.append(Skip(name, (child_path,), "called with keyword arguments, which a part "
                                                               "cannot be traced with"))
                continue
            try:
                r = pass_fn(child, inplace=True, example_inputs=args)
            except (TraceError, PassError) as exc:
                failure = _trace_failure(exc)
                if failure is None:
                    raise
                visit(child_path, child, _reason(failure))
                continue
            if r.module is not child:
                setattr(module, child_name, r.module)
            changes, skips = _prefixed(child_path, r)
            total.changes.extend(changes)
            total.skipped.extend(skips)
            parts.append(child_path)

    visit("", work, whole_reason)
    total.skipped.insert(0, Skip(name, ("<model>",), f"the whole model does not trace ({whole_reason}); "
                                                     f"{len(parts)} part(s) that do were rewritten one by one"))
    total.metrics["piecewise"] = parts
    return total
