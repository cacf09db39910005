"""The untimed warm-up before epoch 1, and the fast path's step captured in it as one CUDA
graph (`GraphedStep`): what would otherwise land in epoch 1's times."""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cifarexp.training.engine import (
    Execution,
    Step,
    compiled_shapes_only,
    random_batch,
    synchronize,
    train_step,
)


def warm_up(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    batch_sizes: Sequence[int],
    execution: Execution = Execution(),
    step: Step = train_step,
    steps: int = 3,
) -> float:
    """Untimed training steps on random data, `steps` per batch size (the full one first),
    then the model and optimizer put back exactly as they were: cuDNN autotuning, CUDA's
    lazy start-up, compilation of the full batch's shape (and of `Execution.batch_stats`
    for each size), CUDA-graph capture (3 calls) and a `GraphedStep`'s capture happen here,
    never in an epoch. Returns the seconds it took (a run's warmup_s)."""
    if steps < 1:
        raise ValueError(f"a warm-up takes at least one step per batch size, not {steps}")
    saved_model = copy.deepcopy(model.state_dict())
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    criterion = nn.CrossEntropyLoss()
    generator = torch.Generator(device).manual_seed(0)  # leaves the global RNG as it was
    graphed = isinstance(step, GraphedStep)
    model.train()
    start = time.perf_counter()
    with _side_stream(device) if graphed else contextlib.nullcontext():
        for i, size in enumerate(batch_sizes):
            images, labels = random_batch(size, device, execution, generator)
            # The first size compiles; the others run as the epochs will run them.
            with compiled_shapes_only(execution) if i else contextlib.nullcontext():
                for _ in range(steps):
                    outputs = train_step(model, criterion, optimizer, images, labels, execution)
            execution.batch_stats(*outputs, labels)  # compiled here, for this size
            # Freed before the capture: the loss's autograd graph holds the gradient
            # accumulators, which the captured backward would find alive on another stream.
            del outputs
            if graphed:
                # The warm steps made the optimizer's state: the graph captures its update.
                assert optimizer.state, "capture needs the optimizer's state"
                # Other sizes: the eager module inside torch.compile's wrapper (`_orig_mod`),
                # whose kernels need no second compilation.
                captured = model if i == 0 else getattr(model, "_orig_mod", model)
                step.capture(captured, criterion, optimizer, images, labels, execution)
    synchronize(device)
    seconds = time.perf_counter() - start
    model.load_state_dict(saved_model)  # copies in place: parameters keep their memory
    if graphed:  # the graph holds the optimizer's state tensors: put back in place
        _zero_state(optimizer)
    else:
        optimizer.load_state_dict(saved_optimizer)
    optimizer.zero_grad(set_to_none=True)
    return seconds


class GraphedStep:
    """`train_step` as one CUDA graph per batch shape: forward, loss, backward and the
    optimizer step captured by `warm_up` for each shape an epoch sees (the full batch, and a
    smaller last one), then replayed on each batch copied into the graph's input tensors:
    one launch a step instead of hundreds of kernels. A compiled model (`--compile default`)
    is captured with Inductor's kernels, compiled by the warm-up's steps before the capture,
    for the full batch; the last batch's graph holds the model's eager kernels (no second
    compilation). A shape never captured steps eagerly, on the same parameters and state.

    Only for SGD with or without Nesterov momentum (config.GRAPHED_OPTIMIZERS), fused (its
    update one kernel; `optim.build_optimizer`): its state (the momentum buffers) is made
    by the warm-up's steps, captured, then zeroed in place; with no dampening a zero
    buffer's first update is the gradient, as a fresh buffer's is, so it trains as a fresh
    optimizer does.
    """

    def __init__(self) -> None:
        self.graphs: dict[torch.Size, _Graph] = {}  # by the images' shape

    def capture(
        self,
        model: nn.Module,
        criterion: nn.Module,
        optimizer: torch.optim.Optimizer,
        images: torch.Tensor,
        labels: torch.Tensor,
        execution: Execution,
    ) -> None:
        """Record one step on `images`' shape (run on a side stream after warm steps)."""
        inputs = images.clone(), labels.clone()  # clone keeps the memory order
        graph = torch.cuda.CUDAGraph()
        optimizer.zero_grad(set_to_none=True)  # backward makes the grads in the graph's pool
        with torch.cuda.graph(graph):
            loss, logits = train_step(
                model, criterion, optimizer, *inputs, execution, autocast_cache=False
            )
        # Detached (the same memory): the captured autograd graph is freed, so the eager
        # steps do not find its gradient accumulators alive on the capture's stream.
        self.graphs[images.shape] = _Graph(graph, inputs, (loss.detach(), logits.detach()))

    def __call__(
        self,
        model: nn.Module,
        criterion: nn.Module,
        optimizer: torch.optim.Optimizer,
        images: torch.Tensor,
        labels: torch.Tensor,
        execution: Execution,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.graphs:
            raise RuntimeError("a GraphedStep trains only once warm_up has captured it")
        captured = self.graphs.get(images.shape)
        if captured is None:
            return train_step(model, criterion, optimizer, images, labels, execution)
        captured.inputs[0].copy_(images)
        captured.inputs[1].copy_(labels)
        captured.graph.replay()
        return captured.outputs


@dataclass(frozen=True)
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, torch.Tensor]  # the images and labels it reads
    outputs: tuple[torch.Tensor, torch.Tensor]  # the loss and logits it writes


@contextlib.contextmanager
def _side_stream(device: torch.device) -> Iterator[None]:
    """Work on a new stream, ordered after and before the current one (CUDA-graph capture
    wants its warm-up off the default stream)."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        yield
    current.wait_stream(side)


def _zero_state(optimizer: torch.optim.Optimizer) -> None:
    """Every state tensor of `optimizer` zeroed where it is (see GraphedStep)."""
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                value.zero_()
