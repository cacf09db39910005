"""Which parameters a captured or compiled step updates otherwise than the eager step: two
copies of the study's model, one stepped eagerly (the study's SGD, Nesterov, lr 0.01), the
other through the step under test, warmed up (and captured) as cifarexp does, on the same
random batches; then, per parameter, |its change - the eager change| / |the eager change|,
the largest first (exact fp32 convolutions, chosen alike for both).

On an H200 the GPU test of the compiled captured step found the weights 45% off as a whole
(tests/test_fast_path.py); this names where.

    python benchmarks/captured_diff.py                  # on the GPU machine: four cases
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from cifarexp.training import fastpath
from cifarexp.training.engine import Execution, compiled_shapes_only, train_step
from cifarexp.training.models import build_model
from cifarexp.training.optim import build_optimizer
from cifarexp.training.warmup import GraphedStep, warm_up

# (captured, compile mode, the batch sizes stepped: 8 is another shape, stepped eagerly)
CASES = [
    (True, "default", (32, 32, 32, 32, 32)),
    (True, "default", (32, 32, 32, 8, 32)),
    (False, "default", (32, 32, 32, 8, 32)),
    (True, "none", (32, 32, 32, 32, 32)),
]


def differences(
    device: torch.device, captured: bool, compile_mode: str, sizes: tuple[int, ...]
) -> tuple[float, list[tuple[float, str]]]:
    """The whole update's relative difference, and each parameter's, the largest first."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = build_model().to(device)
    other = copy.deepcopy(eager)
    before = {name: p.detach().clone() for name, p in eager.named_parameters()}
    eager_opt = build_optimizer("nesterov", eager.parameters(), lr=0.01)
    other_opt = build_optimizer("nesterov", other.parameters(), lr=0.01, fused=captured)
    trained = fastpath.compile_model(other, compile_mode)
    execution = Execution(compiled=compile_mode != "none")
    step = GraphedStep() if captured else train_step
    warm_up(trained, other_opt, device, batch_sizes=[32, 8], execution=execution, step=step)
    generator = torch.Generator(device).manual_seed(1)
    criterion = nn.CrossEntropyLoss()
    for size in sizes:
        images = torch.randn(size, 3, 32, 32, device=device, generator=generator)
        labels = torch.randint(0, 10, (size,), device=device, generator=generator)
        train_step(eager, criterion, eager_opt, images, labels, Execution())
        with compiled_shapes_only(execution):
            step(trained, criterion, other_opt, images, labels, execution)
    per_parameter, diff_sq, change_sq = [], 0.0, 0.0
    for (name, p), q in zip(eager.named_parameters(), other.parameters(), strict=True):
        diff = float((q - p).detach().norm())
        change = float((p.detach() - before[name]).norm())
        diff_sq, change_sq = diff_sq + diff**2, change_sq + change**2
        per_parameter.append((diff / change if change else 0.0, name))
    return (diff_sq / change_sq) ** 0.5, sorted(per_parameter, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--top", type=int, default=8, help="parameters shown per case")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda":
        parser.error("a captured step needs CUDA")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    for captured, compile_mode, sizes in CASES:
        whole, per_parameter = differences(device, captured, compile_mode, sizes)
        print(f"captured={captured} compile={compile_mode} sizes={sizes}: weights {whole:.4f}")
        for error, name in per_parameter[: args.top]:
            print(f"    {error:.4f}  {name}")


if __name__ == "__main__":
    main()
