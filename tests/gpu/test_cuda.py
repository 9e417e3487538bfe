"""The CUDA path, on a CUDA device: rewrites keep the model on its device and match the CPU; SyncBatchNorm's
training forward in a one-process NCCL group; ``check`` with a CUDA reference and the CUDA provider.

Every test is marked ``gpu`` and skipped, with the reason, where torch sees no
CUDA device (``pytest -m gpu`` selects them; a plain ``pytest`` runs them where
a device exists). TF32 is off so that a GPU matmul is a float32 matmul.
"""

from __future__ import annotations

import socket
from typing import Iterator

import pytest
import torch
from torch import nn

import normfold as nf
from normfold.demo import build_demo_model
from normfold.tolerances import RECALIBRATE
from normfold.verify import compare


def _no_cuda_reason() -> str:
    built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return f"no CUDA device: torch {torch.__version__} ({built}) reports torch.cuda.is_available() == False"


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=_no_cuda_reason())]

SHAPE = (4, 3, 32, 32)


@pytest.fixture(autouse=True)
def no_tf32() -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _inputs(device: str) -> torch.Tensor:
    return (torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * 2 + 0.5).to(device)


def _on(model: nn.Module, device: str) -> None:
    where = {t.device.type for t in list(model.parameters()) + list(model.buffers())}
    assert where == {torch.device(device).type}, f"model tensors on {where}, expected {device}"


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    """``a`` matches the reference ``b`` by normfold.verify's rule (the policy of their dtype), across devices."""
    v = compare(b.detach().cpu(), a.detach().cpu())
    assert v.passed, v.describe()


def _stats_close(a: torch.Tensor, b: torch.Tensor) -> None:
    """BatchNorm statistics reduced another way (another device, SyncBatchNorm): the RECALIBRATE rule."""
    assert RECALIBRATE[torch.float32].allclose(a.detach().cpu(), b.detach().cpu())


@torch.no_grad()
def _eval(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x)


def fold_on(device: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(original, folded, input) on ``device``."""
    original = build_demo_model(seed=3).to(device).eval()
    x = _inputs(device)
    return original, nf.fold_batchnorm(original, example_inputs=(x,)).module, x


def test_fold_keeps_the_device_and_matches_cpu() -> None:
    original, folded, x = fold_on("cuda")
    _on(folded, "cuda")
    _close(_eval(folded, x), _eval(original, x))
    _, folded_cpu, x_cpu = fold_on("cpu")
    _close(_eval(folded, x), _eval(folded_cpu, x_cpu))
    for (name, p), (_, q) in zip(folded.state_dict().items(), folded_cpu.state_dict().items()):
        if p.is_floating_point():
            _close(p, q)  # folded in float64 on each device: the same weights


@pytest.mark.parametrize("target", ["frozen", "groupnorm", "syncbn"])
def test_convert_keeps_the_device_and_matches_cpu(target: str) -> None:
    def convert(device: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
        original = build_demo_model(seed=3).to(device).eval()
        x = _inputs(device)
        if target == "frozen":
            return original, nf.freeze_batchnorm(original).module, x
        if target == "groupnorm":
            return original, nf.batchnorm_to_groupnorm(original, calibration_data=x).module, x
        return original, nf.to_syncbn(original).module, x

    original, converted, x = convert("cuda")
    _on(converted, "cuda")
    if target != "groupnorm":  # exact conversions
        _close(_eval(converted, x), _eval(original, x))
    _, converted_cpu, x_cpu = convert("cpu")
    _close(_eval(converted, x), _eval(converted_cpu, x_cpu))


def test_recalibrate_keeps_the_device_and_matches_cpu() -> None:
    data = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 3 - 1

    def run(device: str) -> nn.Module:
        model = build_demo_model(seed=3).to(device)
        return nf.recalibrate(model, data.to(device), batch_size=8, progress=False).model

    gpu, cpu = run("cuda"), run("cpu")
    _on(gpu, "cuda")
    for (name, a), (_, b) in zip(gpu.state_dict().items(), cpu.state_dict().items()):
        if "running" in name:
            _stats_close(a, b)
    _close(_eval(gpu, _inputs("cuda")), _eval(cpu, _inputs("cpu")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_syncbn_training_forward_in_a_one_process_nccl_group() -> None:
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        reference = build_demo_model(seed=3).cuda().train()
        synced = nf.to_syncbn(build_demo_model(seed=3).cuda()).module.train()
        assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
        x = _inputs("cuda")
        out_ref, out_sync = reference(x), synced(x)  # training mode: batch statistics, running stats updated
        _close(out_sync, out_ref)
        out_sync.sum().backward()
        for (name, a), (_, b) in zip(synced.state_dict().items(), reference.state_dict().items()):
            if "running" in name:
                _stats_close(a, b)
    finally:
        dist.destroy_process_group()


def test_check_with_a_cuda_reference_on_the_cuda_provider() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} has no CUDA provider (install onnxruntime-gpu)")
    original, folded, _ = fold_on("cuda")
    report = nf.check(original, candidate=folded, input_shapes=[SHAPE], providers=("cuda", "cpu"),
                      require_provider="cuda")
    assert report.passed, report.final_line()
    assert report.provider == "CUDAExecutionProvider", report.provider_note
    assert "CUDA libraries: " in report.provider_note and "every node" in report.provider_note
