"""What one training step of the fast path costs, for each candidate way to run it: the
study's ResNet-18, batch 128, the step built and warmed up by cifarexp itself
(`build.build_training`, `Training.warm_up`: a CUDA graph captured there for --cuda-graph),
then replayed on one fixed batch already on the device. ms per step from CUDA events over
--steps steps, the median of --repeats; each variant in its own process (Inductor's
settings are process-wide, and a variant that fails leaves the others measured).

  eager        --fast: the eager step (bf16, channels_last, fused SGD) as one CUDA graph
  compiled     --fast --compile default: the Inductor-compiled model's step as one graph
  cd-tuning    compiled, with Inductor's coordinate-descent tuning of its Triton kernels
  autotune     compiled, with Inductor's max-autotune of convolutions and matmuls (no
               CUDA graphs of its own: the whole step is captured by cifarexp)
  eager-512    eager at batch 512, per 128 images: what a larger batch would buy

Printed per variant: ms per step, s per 391-step epoch (50,000 images at batch 128), the
warm-up (compile and capture) s, and the loss on the fixed batch after every variant's same
number of steps (all start from the same weights: a broken step shows as a different loss).

    python benchmarks/step_probe.py                        # on the GPU machine, all variants
    python benchmarks/step_probe.py --variants eager,compiled --steps 100
    python benchmarks/step_probe.py --device cpu --steps 2 --repeats 1 --variants eager
      (CPU: --fast's CPU settings, nothing captured: a smoke test of the script, not a result)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

STEPS_PER_EPOCH = 391  # 50,000 images at batch 128
# name -> (TrainConfig settings beside --fast's, Inductor settings, batch size)
VARIANTS: dict[str, tuple[dict[str, object], dict[str, object], int]] = {
    "eager": ({}, {}, 128),
    "compiled": ({"compile": "default"}, {}, 128),
    "cd-tuning": ({"compile": "default"}, {"coordinate_descent_tuning": True}, 128),
    "autotune": ({"compile": "default"}, {"max_autotune": True}, 128),
    "eager-512": ({}, {}, 512),
}


def measure(name: str, device: str, steps: int, repeats: int) -> dict[str, object]:
    """One variant, in this process: its warm-up, ms per step (per 128 images), final loss."""
    import torch
    from torch import nn

    from cifarexp.config import TrainConfig, fast_settings
    from cifarexp.training.build import build_training
    from cifarexp.training.engine import synchronize

    settings, inductor, batch_size = VARIANTS[name]
    kind = torch.device(device).type
    if kind != "cuda":
        settings = {k: v for k, v in settings.items() if k != "compile"}  # a smoke test
    if inductor:
        import torch._inductor.config as inductor_config

        for key, value in inductor.items():
            setattr(inductor_config, key, value)
    cfg = TrainConfig(
        dataset="synthetic",
        train_size=2 * batch_size,
        batch_size=batch_size,
        device=device,
        seed=0,
        workers=0,
    )
    cfg = cfg.replace(**(fast_settings(kind, cfg.optimizer) | settings))
    training = build_training(cfg)
    warmup_s = training.warm_up()
    images, labels = next(iter(training.loader))
    criterion = nn.CrossEntropyLoss()
    model, optimizer, execution = training.train_model, training.optimizer, training.execution

    def step() -> torch.Tensor:
        return training.step(model, criterion, optimizer, images, labels, execution)[0]

    times = []
    for _ in range(repeats):
        synchronize(training.device)
        start = time.perf_counter()
        for _ in range(steps):
            loss = step()
        synchronize(training.device)
        times.append((time.perf_counter() - start) / steps)
    per_128 = statistics.median(times) * 1000 * 128 / batch_size
    return {
        "variant": name,
        "ms": per_128,
        "warmup_s": warmup_s,
        "loss": float(loss.item()),
        "steps": steps * repeats,
    }


def run_variant(name: str, args: argparse.Namespace) -> dict[str, object]:
    """`measure` in a child process; its error's last line if it fails or times out."""
    command = [sys.executable, __file__, "--one", name, "--device", args.device]
    command += ["--steps", str(args.steps), "--repeats", str(args.repeats)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"variant": name, "error": f"not done in {args.timeout} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"variant": name, "error": f"exit {done.returncode}: {last[:150]}"}
    return json.loads(lines[-1])


def report(results: list[dict[str, object]], args: argparse.Namespace) -> None:
    import torch

    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"\nResNet-18, one fixed batch, {name}, torch {torch.__version__}; median of "
          f"{args.repeats} x {args.steps} steps, ms per 128 images\n")  # fmt: skip
    print(f"{'variant':<10}  {'ms/step':>8}  {'s/epoch':>8}  {'warm-up s':>9}  {'loss':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<10}  failed: {r['error']}")
            continue
        epoch = r["ms"] * STEPS_PER_EPOCH / 1000
        warmup = "–" if r["warmup_s"] is None else f"{r['warmup_s']:.1f}"
        print(f"{r['variant']:<10}  {r['ms']:>8.3f}  {epoch:>8.3f}  {warmup:>9}  {r['loss']:>8.4f}")
    print(f"(loss: on the fixed batch after {results[0].get('steps', '?')} timed steps; "
          "eager-512 trains another batch size, so its loss is not comparable)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per variant")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one variant, print its JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.device, args.steps, args.repeats)))
        return
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    results = []
    for name in names:
        results.append(run_variant(name, args))
        print(json.dumps(results[-1]), flush=True)
    report(results, args)


if __name__ == "__main__":
    main()
