"""The fast path: its options turned into torch settings, and what its epochs are
measured against (the model's FLOPs and the device's peak, for `mfu`)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from cifarexp.config import TrainConfig
from cifarexp.training.engine import Execution

# Dense (no sparsity) peak FLOP/s by math mode, from NVIDIA's datasheets. Matched against the
# lower-cased device name, first match first: the PCIe and NVL cards before the SXM ones.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("h100 pcie", {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("h100 nvl", {"bf16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    ("h200 nvl", {"bf16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    ("h100", {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12}),  # SXM
    ("h200", {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12}),  # SXM
    ("a100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
)


def set_math_mode(precision: str) -> None:
    """TF32 matmuls with --precision tf32 only. cuDNN may run convolutions in TF32 in every
    mode: PyTorch's default, which the study ran with. Set on every run: the flags are
    process-wide, and one process may run several configs."""
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = True


def math_mode(precision: str) -> str:
    """The math the model's FLOPs run in: with fp32, cuDNN's TF32 convolutions carry them."""
    return "tf32" if precision == "fp32" and torch.backends.cudnn.allow_tf32 else precision


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's dense peak FLOP/s for `precision`, or None for a device not in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for fragment, peaks in PEAK_FLOPS:
        if fragment in name:
            return peaks[math_mode(precision)]
    return None


def flops_per_image(model: nn.Module, *, batch_size: int = 2) -> float:
    """Forward + backward FLOPs of one trained image, as torch.utils.flop_counter counts them.

    Counted on a copy of the model on the meta device: shapes only, nothing computed, and
    the model (its batch-norm statistics included) untouched.
    """
    from torch.utils.flop_counter import FlopCounterMode  # imports torch._dynamo: ~1 s

    meta = copy.deepcopy(model).to("meta").train()
    images = torch.zeros(batch_size, 3, 32, 32, device="meta")
    labels = torch.zeros(batch_size, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(meta(images), labels).backward()
    return counter.get_total_flops() / batch_size


def memory_format(cfg: TrainConfig) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def compile_model(model: nn.Module, mode: str) -> nn.Module:
    """torch.compile'd for one batch shape (dynamic=False: no slower shape-generic code); see
    `engine.compiled_shapes_only` for the other shapes. mode "none" returns the model."""
    if mode == "none":
        return model
    return torch.compile(model, mode=mode, dynamic=False)


def execution(cfg: TrainConfig, model: nn.Module, device: torch.device) -> Execution:
    """The engine's settings for `cfg`, with the model's FLOPs counted once (for mfu)."""
    return Execution(
        autocast_dtype=torch.bfloat16 if cfg.precision == "bf16" else None,
        channels_last=cfg.channels_last,
        compiled=cfg.compile != "none",
        timing=cfg.timing,
        flops_per_image=flops_per_image(model),
        peak_flops=peak_flops(device, cfg.precision),
    )


def warmup_batch_sizes(images: int, batch_size: int, max_batches: int | None) -> list[int]:
    """The batch sizes an epoch will see: the full one first, then a smaller last one."""
    full, last = divmod(images, batch_size)
    sizes = [batch_size] if full else []
    if last and (max_batches is None or max_batches > full):
        sizes.append(last)
    return sizes
