"""Rewrite -> verify -> write, in the library: what every command does, reachable from Python.

The commands of :mod:`normfold.cli` only parse flags, call these functions and
print. The rules live here, once:

* **The eval form.** A rewrite is of the model a user deploys: its eval form.
  A state_dict carries no mode (torchvision and timm factories build models in
  training mode), a pickled module may have been saved in training mode, and
  an ExportedProgram's module refuses ``.eval()``; :func:`eval_form` gives the
  eval form of each, and says what it changed.
* **Outputs before work.** The commands refuse an output path that cannot be
  written (missing folder, a directory, no permission, the input itself)
  before any work starts, with :func:`normfold.io.check_output_path` (the one
  rule for output paths, which :func:`normfold.io.save_model` applies too).
* **Inputs before allocating.** :func:`check_input_size` refuses random inputs
  whose bytes exceed a limit, naming the bytes and the flag that overrides it.
* **No silent no-op.** :class:`RewriteOutcome` says whether the rewrite
  changed anything; a rewrite that changed nothing is not a success unless
  the caller accepts it (``allow_noop``).
"""

from __future__ import annotations

import functools

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from normfold.errors import InputError

__all__ = ["check_input_size", "input_bytes", "DEFAULT_MAX_INPUT_BYTES", "eval_form",
           "ExportedModel", "as_module", "exported_eval_graph", "interrupted_by", "RewriteOutcome", "rewrite_and_verify",
           "fold",
           "format_bytes"]

#: random inputs larger than this are refused unless the caller raises the limit (``--max-input-bytes``):
#: 2 GiB is 20x a batch of 8 ImageNet images in float64, and far below what would take a machine down
DEFAULT_MAX_INPUT_BYTES = 2 * 2**30


# -------------------------------------------------------------------------------------------------- inputs


def format_bytes(n: int) -> str:
    """``128849018880`` -> ``"120 GiB"``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


def input_bytes(shapes: Sequence[Sequence[int]], dtype: torch.dtype) -> int:
    """Peak bytes :func:`normfold.inputs.random_inputs` allocates for ``shapes``.

    Inputs are drawn in float64 (the same values in every dtype) and cast,
    so one input costs ``8 + itemsize`` bytes per element while it is made.
    """
    item = torch.empty((), dtype=dtype).element_size()
    return sum(math.prod(int(s) for s in shape) for shape in shapes) * item + \
        max((math.prod(int(s) for s in shape) for shape in shapes), default=0) * 8


def check_input_size(shapes: Sequence[Sequence[int]], dtype: torch.dtype, *,
                     limit: int | None = DEFAULT_MAX_INPUT_BYTES, flag: str = "--max-input-bytes") -> int:
    """Refuse inputs whose allocation exceeds ``limit`` bytes, before allocating; return the bytes.

    The model's activations need more again; this guard only stops a typo
    (``100000,3,224,224``) from asking for 120 GB.
    """
    need = input_bytes(shapes, dtype)
    if limit is not None and need > limit:
        shown = " ".join(",".join(map(str, s)) for s in shapes)
        raise InputError(f"inputs of shape {shown} ({str(dtype).replace('torch.', '')}) would take "
                         f"{format_bytes(need)} ({need} bytes) to create, over the limit of {format_bytes(limit)}; "
                         f"pass a smaller --input-shape, or {flag} {need} to allow it")
    return need


# ---------------------------------------------------------------------------------------------- eval form


def exported_eval_graph(graph_module: torch.fx.GraphModule) -> list[str]:
    """Turn the training-mode ops of an ExportedProgram's module into their eval form, in place.

    A program exported from a model in training mode computes batch
    statistics (``aten.batch_norm(..., training=True, ...)``, the
    ``_native_batch_norm_legit`` family) and applies dropout; its module
    refuses ``.eval()`` ("Calling eval() is not supported yet"), and torch
    2.14 no longer ships ``torch.ao.quantization.move_exported_model_to_eval``.
    The eval form of those ops is the same call with ``training=False``
    (``batch_norm`` then reads the running statistics the program holds as
    buffers) and dropout removed. Returns the names of the nodes changed.
    """
    aten = torch.ops.aten
    changed: list[str] = []
    g = graph_module.graph
    for node in list(g.nodes):
        if node.op != "call_function":
            continue
        if node.target in (aten.batch_norm.default,) and len(node.args) > 5 and node.args[5] is True:
            node.args = node.args[:5] + (False,) + node.args[6:]
            changed.append(node.name)
        elif node.target in (aten._native_batch_norm_legit_functional.default,) and node.args[5] is True:
            node.args = node.args[:5] + (False,) + node.args[6:]
            changed.append(node.name)
        elif node.target in (aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default) \
                and len(node.args) > 2 and node.args[2] is True:
            node.replace_all_uses_with(node.args[0])
            g.erase_node(node)
            changed.append(node.name)
    if changed:
        g.lint()
        graph_module.recompile()
    # the module's own flags follow its ops (setting them directly: its .eval() raises)
    for m in graph_module.modules():
        m.training = False
    return changed


class ExportedModel(nn.Module):
    """An ExportedProgram's module as an ordinary eval-mode ``nn.Module``.

    ``program.module()`` refuses ``.eval()`` / ``.train()``, which every
    comparison calls; this wrapper runs the module with its training-mode ops
    turned into their eval form (:func:`exported_eval_graph`) and keeps the
    mode fixed (``eval_ops=False`` keeps the ops as exported, for a
    candidate that must be checked as it is). A program exported with a fixed batch size ``B`` only runs
    batches of ``B``: other batch sizes are run in chunks of ``B``, the last
    chunk filled up with copies of its last sample whose outputs are dropped,
    so that a sample's output is what the program computes for it in a batch
    of ``B`` (batch-mates still differ between chunkings, so a program that
    mixes samples is still caught by the batch-independence probe).
    """

    def __init__(self, program: Any, *, eval_ops: bool = True) -> None:
        super().__init__()
        self.program_module = program.module()
        if eval_ops:
            self.eval_edits = exported_eval_graph(self.program_module)
        else:  # run as it is (a candidate under check): only the flags, so that .eval() is not refused
            self.eval_edits = []
            for m in self.program_module.modules():
                m.training = False
        self.fixed_batch = _fixed_batch(program)
        self._program_inputs = _example_like(program)
        self.training = False

    def example_inputs(self, seed: int = 0) -> tuple[torch.Tensor, ...] | None:
        """Seeded inputs shaped like the program's example inputs (None when it does not record them)."""
        from normfold.passes.fold_exported import program_inputs

        return program_inputs(self._program_inputs, seed=seed) if self._program_inputs is not None else None

    def train(self, mode: bool = True) -> "ExportedModel":  # noqa: D102 - the mode is fixed to eval
        return self

    def forward(self, x: Any, *rest: Any) -> Any:
        # the first input named (not only *args): torch.export matches dynamic_shapes to a signature's parameters
        args = (x,) + rest
        b = self.fixed_batch
        if b is None or not args or not isinstance(args[0], torch.Tensor) or args[0].dim() == 0 \
                or args[0].shape[0] == b:
            return self.program_module(*args)
        n = args[0].shape[0]
        outs = []
        for start in range(0, n, b):
            chunk = [a[start:start + b] if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == n else a
                     for a in args]
            k = chunk[0].shape[0]
            if k < b:
                chunk = [torch.cat([c, c[-1:].expand(b - k, *c.shape[1:])]) if isinstance(c, torch.Tensor)
                         and c.dim() and c.shape[0] == k else c for c in chunk]
            outs.append((k, self.program_module(*chunk)))
        return _cat_chunks(outs)


def _cat_chunks(outs: list[tuple[int, Any]]) -> Any:
    first = outs[0][1]
    if isinstance(first, torch.Tensor):
        return torch.cat([o[:k] for k, o in outs])
    if isinstance(first, (list, tuple)):
        return type(first)(_cat_chunks([(k, o[i]) for k, o in outs]) for i in range(len(first)))
    if isinstance(first, dict):
        return {key: _cat_chunks([(k, o[key]) for k, o in outs]) for key in first}
    return first


def _example_like(program: Any) -> Any:
    ex = getattr(program, "example_inputs", None)
    if ex is not None and ex[0] and all(isinstance(a, torch.Tensor) for a in ex[0]) and not ex[1]:
        return _Examples(tuple(torch.empty(a.shape, dtype=a.dtype) for a in ex[0]))
    return None


class _Examples:
    def __init__(self, args: tuple[torch.Tensor, ...]) -> None:
        self.example_inputs = (args, {})


def _fixed_batch(program: Any) -> int | None:
    """The first input's batch size when the program was exported with it static, else None."""
    user = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() and isinstance(val.shape[0], int):
                return int(val.shape[0])
            return None
    return None


def as_module(loaded: Any) -> nn.Module:
    """The model of a :class:`normfold.io.LoadedModel` as it is (a .pt2 wrapped so that it runs), for a candidate
    whose training-mode layers a check must see, not fix."""
    if loaded.kind == "exported":
        return ExportedModel(loaded.program, eval_ops=False)
    return loaded.module


def eval_form(loaded: Any) -> tuple[nn.Module, str | None]:
    """The eval form of a :class:`normfold.io.LoadedModel`'s model, and a one-line note of what that changed.

    The note is None when the model already was in eval. A state_dict's
    model is built by a factory (training mode for torchvision and timm),
    a pickled module may have been saved in training mode, a .pt2's module
    is wrapped in :class:`ExportedModel`; the rewrite, its check and the
    written file are all of the eval form.
    """
    module = loaded.module
    if loaded.kind == "exported":
        # the program itself is turned into its eval form, so that what folds it (the ATen-level fold) and
        # what runs it (its module) see the same ops
        edits = exported_eval_graph(loaded.program.graph_module)
        wrapped = ExportedModel(loaded.program)
        note = None
        if edits or wrapped.eval_edits:
            note = (f"{loaded.path} was exported in training mode ({len(edits) or len(wrapped.eval_edits)} "
                    "batch_norm/dropout op(s)); using its eval form")
        return wrapped, note
    training = [n or "<model>" for n, m in module.named_modules() if m.training]
    if not training:
        return module, None
    module.eval()
    if loaded.kind in ("state_dict", "hf"):
        return module, None  # a state_dict has no mode: eval is what it means, nothing to report
    return module, (f"{loaded.path} was saved in training mode ({len(training)} module(s)); "
                    "using its eval form")


def interrupted_by(exc: BaseException) -> bool:
    """Whether ``exc`` wraps a KeyboardInterrupt (some tracers turn one into their own error)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


# ------------------------------------------------------------------------------------ rewrite and verify


@dataclass
class RewriteOutcome:
    """A rewrite, its comparison with the original, and whether it may be written.

    ``noop`` is True when the rewrite changed nothing; ``passed`` when the
    comparison passed (always for an approximate rewrite whose outputs are
    finite: its error is measured, not judged).
    """

    result: Any
    verification: Any
    exact: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def noop(self) -> bool:
        return not self.result.changes

    @property
    def passed(self) -> bool:
        if self.exact:
            return self.verification.passed
        return not self.broken_outputs()

    def broken_outputs(self) -> list[Any]:
        """Outputs an approximate rewrite made unusable (non-finite, wrong shape), not merely different."""
        return [c for c in self.verification.comparisons
                if c.nan_count or c.inf_count or tuple(c.candidate_shape) != tuple(c.reference_shape)
                or c.max_abs != c.max_abs]


    def may_write(self, *, allow_noop: bool = False) -> bool:
        """Whether the rewritten model may be written: it passed, and it changed something (or that is accepted)."""
        return self.passed and (not self.noop or allow_noop)


def rewrite_and_verify(original: nn.Module, rewrite: Callable[[nn.Module], Any], inputs: Sequence[torch.Tensor], *,
                       tolerance: Any = None, exact: bool = True, copy: bool = True) -> RewriteOutcome:
    """Rewrite a copy of ``original`` with ``rewrite(model) -> PassResult`` and compare it with ``original``.

    The comparison is :func:`normfold.verify.verify` (the one rule; ``tolerance``
    None is the per-dtype policy). ``original`` is not touched when ``copy`` is
    true. Write the result (``normfold.io.save_model``) only when
    ``outcome.may_write()``.
    """
    from normfold.passes.base import copy_module
    from normfold.verify import verify

    model = copy_module(original) if copy else original
    result = rewrite(model)
    return RewriteOutcome(result=result, verification=verify(original, result.module, inputs, tolerance=tolerance),
                          exact=exact)


def fold(model: nn.Module, example_inputs: Sequence[torch.Tensor] | dict[str, torch.Tensor], *, tolerance: Any = None,
         merge_branches: bool = False) -> RewriteOutcome:
    """What ``normfold fold`` does, from Python: the eval form of ``model`` folded (part by part when it does not
    trace whole, :func:`normfold.passes.piecewise.piecewise`) and verified against it.

    ``example_inputs`` are positional inputs, or a dict of keyword inputs (a Hugging Face model's
    ``input_ids`` / ``attention_mask`` / ``pixel_values``, :func:`normfold.inputs.hf_example_inputs`).
    ``merge_branches`` also merges the parallel branches of re-parameterizable blocks into one conv each
    (:func:`normfold.merge_branches`). ``model`` is not touched. ``outcome.result.module`` is the folded model,
    ``outcome.verification`` the comparison, ``outcome.may_write()`` the verdict.
    """
    from normfold.passes.base import copy_module
    from normfold.passes.fold_batchnorm import fold_batchnorm
    from normfold.passes.piecewise import piecewise

    if any(m.training for m in model.modules()):
        model = copy_module(model).eval()
    fold_fn = functools.partial(fold_batchnorm, merge_branches=merge_branches)

    def rewrite(m: nn.Module, inputs: tuple) -> Any:
        return piecewise(fold_fn, m, inplace=True, example_inputs=inputs, pass_name="fold_batchnorm")

    if isinstance(example_inputs, dict):
        import contextlib

        from normfold.hf import traceable

        # keyword inputs: the copy is made before both models take them positionally (normfold.hf.traceable), so
        # the folded model leaves the block with its own class and its config's use_cache, as the original does
        work = copy_module(model)
        with contextlib.ExitStack() as stack:
            stack.enter_context(traceable(model, example_inputs))
            inputs = stack.enter_context(traceable(work, example_inputs))
            # the rewrite takes the copy made above, wrapped like the reference
            return rewrite_and_verify(model, lambda _: rewrite(work, inputs), inputs, tolerance=tolerance, copy=False)
    inputs = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)
    return rewrite_and_verify(model, lambda m: rewrite(m, inputs), inputs, tolerance=tolerance)
