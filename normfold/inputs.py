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

__all__ = ["parse_shape", "random_inputs", "infer_input_shapes", "InferredInputs", "run_model", "hf_example_inputs"]

#: mean and standard deviation of seeded random inputs
INPUT_MEAN = 0.5
INPUT_STD = 2.0
#: image side of a Hugging Face vision model whose config gives no ``image_size`` (ImageNet's)
DEFAULT_IMAGE_SIZE = 224


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


#: the main keyword input of a Hugging Face model, by what it reads: audio features, images, token ids
_HF_MAIN_INPUTS = ("input_features", "pixel_values", "input_ids")


def hf_example_inputs(model: nn.Module, shape: Sequence[int] | None = None, *, seed: int = 0
                      ) -> tuple[dict[str, torch.Tensor], str]:
    """Seeded keyword inputs for a Hugging Face model, built from its config: (inputs, what they are).

    The model's ``forward`` decides which input it reads first of ``input_features`` (Whisper-like
    audio: ``(batch, num_mel_bins, 2 * max_source_positions)``), ``pixel_values`` (images:
    ``(batch, num_channels, image_size, image_size)``, ``image_size`` :data:`DEFAULT_IMAGE_SIZE` when the config
    has none) and ``input_ids`` (token ids drawn uniformly
    from ``[0, vocab_size)``, shape ``(batch, sequence)``, default ``(2, 16)``); ``shape`` replaces
    that default shape. Token ids come with an ``attention_mask`` of ones when forward takes one, and
    an encoder-decoder model (forward takes ``decoder_input_ids``) gets ``batch x 4`` decoder token ids.
    Float inputs are ``N(INPUT_MEAN, INPUT_STD^2)`` in the model's dtype.
    """
    import inspect

    config = getattr(model, "config", None)
    params = inspect.signature(type(model).forward).parameters
    main = next((k for k in _HF_MAIN_INPUTS if k in params), None)
    if config is None or main is None:
        raise InputError(f"{type(model).__name__}.forward takes none of {', '.join(_HF_MAIN_INPUTS)}; pass the "
                         "inputs as a file (check --inputs) or convert it from Python with example_inputs")
    dtype, device = model_dtype_device(model)
    text_config = getattr(config, "text_config", None) or getattr(config, "decoder", None) or config
    vocab = getattr(config, "vocab_size", None) or getattr(text_config, "vocab_size", None)
    g_seed = seed
    out: dict[str, torch.Tensor] = {}

    def need(name: str, value: Any) -> Any:
        if value is None:
            raise InputError(f"{type(model).__name__}'s config has no {name}; pass --input-shape")
        return value

    if main == "input_ids":
        s = tuple(shape) if shape else (2, 16)
        if len(s) != 2:
            raise UsageError(f"--input-shape {','.join(map(str, s))}: token ids are batch,sequence (like 2,16)")
        out["input_ids"] = random_inputs([s], seed=g_seed, device=device, integer_high=int(need("vocab_size", vocab)))[0]
        what = f"token ids {s[0]}x{s[1]} in [0, {vocab})"
        if "attention_mask" in params:
            out["attention_mask"] = torch.ones(s, dtype=torch.long, device=device)
            what += " with an attention mask of ones"
    else:
        rank, like = (4, "2,3,224,224") if main == "pixel_values" else (3, "2,80,3000")
        if shape:
            s = tuple(shape)
            if len(s) != rank:
                raise UsageError(f"--input-shape {','.join(map(str, s))}: {main} has {rank} dimensions, like {like}")
        elif main == "pixel_values":
            vision = getattr(config, "vision_config", None) or config
            # a conv net's config (ResNet, RegNet) names no image size: it takes any, and 224 is what it was made for
            size = getattr(vision, "image_size", None) or DEFAULT_IMAGE_SIZE
            size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
            s = (2, int(getattr(vision, "num_channels", 3)), *map(int, size))
        else:
            s = (2, int(need("num_mel_bins", getattr(config, "num_mel_bins", None))),
                 2 * int(need("max_source_positions", getattr(config, "max_source_positions", None))))
        out[main] = random_inputs([s], seed=g_seed, dtype=dtype, device=device)[0]
        what = f"{main} {'x'.join(map(str, s))}"
    if "decoder_input_ids" in params and main != "input_ids":
        d = (out[main].shape[0], 4)
        out["decoder_input_ids"] = random_inputs([d], seed=g_seed + 1, device=device,
                                                 integer_high=int(need("vocab_size", vocab)))[0]
        what += f", decoder token ids {d[0]}x{d[1]}"
    return out, what
