"""Example inputs: parse ``--input-shape``, infer a shape from the model, seed random inputs.

Random inputs are drawn with a non-zero mean and a large variance
(``N(0.5, 2^2)``) rather than ``[0, 1)``: a fold that is wrong only for
negative inputs or large magnitudes must show up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from normfold.errors import InputError, UsageError

__all__ = ["parse_shape", "random_inputs", "infer_input_shapes", "InferredInputs", "run_model"]

#: mean and standard deviation of seeded random inputs
INPUT_MEAN = 0.5
INPUT_STD = 2.0


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse ``"1,3,224,224"`` (or ``1x3x224x224``) into a tuple of positive ints."""
    parts = [p for p in text.replace("x", ",").replace(" ", "").split(",") if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(f"--input-shape {text!r} is not a list of integers; write it like 1,3,224,224") from None
    if not shape or any(s <= 0 for s in shape):
        raise UsageError(f"--input-shape {text!r} must be positive integers, like 1,3,224,224")
    return shape


def random_inputs(shapes: Sequence[tuple[int, ...]], *, seed: int = 0, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu", integer_high: int | None = None) -> tuple[torch.Tensor, ...]:
    """Seeded inputs ``N(INPUT_MEAN, INPUT_STD^2)`` of the given shapes (token ids if ``integer_high``)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        if integer_high is not None:
            out.append(torch.randint(0, integer_high, s, generator=g).to(device))
        else:
            t = torch.randn(s, generator=g, dtype=torch.float64) * INPUT_STD + INPUT_MEAN
            out.append(t.to(device=device, dtype=dtype))
    return tuple(out)


@dataclass
class InferredInputs:
    shapes: list[tuple[int, ...]]
    reason: str
    integer_high: int | None = None


def _first_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    for name, m in model.named_modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding)):
            return name, m
    return None


def model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    for b in model.buffers():
        if b.is_floating_point():
            return b.dtype, b.device
    return torch.float32, torch.device("cpu")


def run_model(model: nn.Module, inputs: Sequence[Any]) -> Any:
    """Run ``model`` in eval under no_grad, restoring every module's train flag afterwards."""
    from normfold.graph import eval_mode

    with eval_mode(model), torch.no_grad():
        return model(*inputs)


def infer_input_shapes(model: nn.Module, *, batch: int = 2) -> InferredInputs:
    """Guess an input shape from the model's first layer and check it with one forward pass.

    The first Conv/Linear/Embedding in registration order decides the channel
    count; for 2-D convs the image sizes 224, 64, 32, 299 and 16 are tried in that order
    (smaller sizes first for 3-D volumes).
    """
    first = _first_layer(model)
    if first is None:
        raise InputError("cannot infer an input shape (no Conv, Linear or Embedding layer); pass --input-shape")
    name, m = first
    candidates: list[tuple[int, ...]] = []
    integer_high = None
    if isinstance(m, nn.modules.conv._ConvNd):
        nd = len(m.kernel_size)
        c = m.in_channels
        # Images are usually 224 wide; volumes and signals are smaller or longer (a 224^3 volume costs ~20 s).
        sizes = {1: (1024, 224, 64, 16000), 2: (224, 64, 32, 299, 16), 3: (16, 32, 64, 112)}.get(nd, (16, 32))
        for size in sizes:
            candidates.append((batch, c) + (size,) * nd)
    elif isinstance(m, nn.Linear):
        candidates = [(batch, m.in_features), (batch, 8, m.in_features)]
    else:
        integer_high = m.num_embeddings
        candidates = [(batch, 16)]
    dtype, device = model_dtype_device(model)
    errors = []
    for shape in candidates:
        try:
            x = random_inputs([shape], dtype=dtype, device=device, integer_high=integer_high)
            run_model(model, x)
        except Exception as exc:  # any failure means: not this shape
            errors.append(f"{shape}: {type(exc).__name__}")
            continue
        return InferredInputs([shape], f"input shape {','.join(map(str, shape))} inferred from the first layer "
                                       f"({name}: {type(m).__name__}); pass --input-shape to choose", integer_high)
    raise InputError(
        f"cannot infer an input shape from the first layer ({name}: {type(m).__name__}; tried "
        f"{', '.join(errors)}); pass --input-shape"
    )
