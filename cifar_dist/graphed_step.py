"""``--whole-step-graph``: the whole training step (forward, loss, backward, Adam) as one CUDA graph.

The compiled step (``--compile-step``, torch.compile's reduce-overhead mode) replays CUDA graphs for the forward
and backward passes; the loss, the optimizer step and the compiled function's per-call checks (its guards, and
cudagraph trees' checks of every parameter's address before a replay) still cost host work every step, and at
batch 32 on a current GPU that work may set the pace. ``GraphedStep`` records everything a step does on the
device once, so that a step costs two input copies and one replay. With ``--compile-step`` the model inside
the graph is inductor's (``torch.compile`` without CUDA graphs of its own; its guards are checked once, while
recording, never at a replay).

What the graph holds fixed, and why that is safe here: the batch shape (epochs are cut to whole global
batches), the learning rate (the recipe's Adam has no schedule), the step's mode (train, frozen stages in
eval), and the addresses of the parameters, BatchNorm buffers and Adam's state, which everything else (the
checkpoint, evaluation, resume) reads and writes in place. It is recorded after any resume, so it holds the
loaded state. One process, no gradient accumulation, no fp16 loss scaling (its inf checks read the device).
On a CPU there are no CUDA graphs: the same step runs over the same static buffers without recording, which
is what the CPU tests exercise.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from cifar_dist.steps import optimizer_to_step, step_figures

# Steps before recording, on a side stream: cuDNN/cuBLAS choose their kernels (and time them under
# --cudnn-benchmark), inductor compiles, Adam makes its state. Their effects are undone before recording.
WARMUP_STEPS = 3


class GraphedStep:
    """``step(inputs, labels)`` -> this step's [loss sum, correct, count, non-finite loss], as train_step returns.

    ``model`` and ``optimizer`` are the trainer's, prepared by accelerate (autocast is the prepared model's
    own, entered inside each recorded forward), the optimizer a fused Adam built with ``capturable=True``.
    ``example`` is one training batch (inputs, labels) on the device: the static buffers' shapes. Nothing is
    recorded until ``record`` (``trainer_parts.record_step``: the trainer's comes after any resume).
    """

    def __init__(self, model, optimizer, example: tuple[torch.Tensor, torch.Tensor], input_name: str,
                 compile_model: bool):
        self.model = model
        self.optimizer = optimizer_to_step(optimizer)
        self.forward = torch.compile(model, dynamic=False) if compile_model else model
        self.input_name = input_name
        self.inputs, self.labels = (t.clone() for t in example)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.stats: torch.Tensor | None = None
        self.record_s: float | None = None

    @property
    def captures(self) -> bool:
        return self.inputs.device.type == "cuda"

    def record(self) -> float:
        """Warm up, undo the warm-up, record the graph (on CUDA); seconds taken."""
        start = time.perf_counter()
        self.model.train()
        with _undone(self.model, self.optimizer), _side_stream(self.captures):
            for _ in range(WARMUP_STEPS):
                self.optimizer.zero_grad(set_to_none=True)
                self._step()
        self.optimizer.zero_grad(set_to_none=True)  # the recorded backward makes the gradients, in graph memory
        if self.captures:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.stats = self._step()
            torch.cuda.synchronize(self.inputs.device)
        self.record_s = time.perf_counter() - start
        return self.record_s

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        assert self.record_s is not None, "record() first (trainer_parts.record_step)"
        self.inputs.copy_(inputs, non_blocking=True)
        self.labels.copy_(labels, non_blocking=True)
        if self.graph is None:  # a CPU: the same step, run rather than replayed
            self.optimizer.zero_grad(set_to_none=True)
            return self._step()
        self.graph.replay()
        return self.stats.clone()  # the next replay overwrites the graph's own

    def _step(self) -> torch.Tensor:
        logits = self.forward(**{self.input_name: self.inputs})
        loss = F.cross_entropy(logits, self.labels)
        stats = step_figures(loss, logits, self.labels)
        loss.backward()
        self.optimizer.step()
        return stats


@contextlib.contextmanager
def _undone(model, optimizer):
    """Puts parameters, buffers and Adam's state back as they were (in place: the graph records these
    addresses); state Adam made inside goes back to zero, which is what a fresh Adam starts from."""
    tensors = [*model.parameters(), *model.buffers()]
    saved = [t.detach().clone() for t in tensors]
    adam = {(p, k): v.clone() for p, s in optimizer.state.items() for k, v in s.items() if torch.is_tensor(v)}
    yield
    with torch.no_grad():
        for tensor, value in zip(tensors, saved):
            tensor.copy_(value)
        for param, state in optimizer.state.items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    before = adam.get((param, key))
                    value.copy_(before) if before is not None else value.zero_()


@contextlib.contextmanager
def _side_stream(cuda: bool):
    """The warm-up on a side stream, as CUDA graph recording wants; nothing to do off CUDA."""
    if not cuda:
        yield
        return
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        yield
    torch.cuda.current_stream().wait_stream(side)
