"""One CUDA graph for the whole training step (forward, loss, backward, Adam): an experiment, not the trainer's step.

The trainer's compiled step replays CUDA graphs for the forward and backward passes; the loss, the running
totals, the optimizer step and the loop around them still cost host work every step, and at batch 32 on a
current GPU that work may set the pace. ``GraphedStep`` captures everything a step does on the device in one
graph, so that a step costs two input copies and one replay. The benchmark's ``graphed`` variant times it (the
most that removing per-step host work can give) and tests/test_gpu.py checks that it trains as the eager step
does. With ``compile_model`` the model inside the graph is inductor's (``torch.compile`` without its own CUDA
graphs): its fused kernels, without the compiled step's per-call guard and CUDA-graph-tree checks (the
``graphed_compiled`` variant). One process, no gradient accumulation, CUDA only; unmeasured until a GPU runs it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from cifar_dist.config import UserError
from cifar_dist.steps import step_figures

WARMUP_STEPS = 3  # on a side stream before capture: cuDNN/cuBLAS choose their kernels, Adam makes its state


class GraphedStep:
    """``step(inputs, labels)`` -> this step's [loss sum, correct, count, non-finite loss], as train_step returns.

    Built from the trainer's pieces (``trainer_parts.build`` with ``--compile-step no``): their model, with
    accelerate's autocast wrapper taken off (autocast is entered here, with its cache off as CUDA graphs need),
    and a capturable fused Adam with the trainer's Adam settings. The warm-up's effects on weights, BatchNorm
    statistics and Adam's state are undone before capture, so the first replay is the run's first step.
    """

    def __init__(self, parts, compile_model: bool = False):
        if parts.accelerator.device.type != "cuda":
            raise UserError("graphed: one CUDA graph for the whole step needs a CUDA GPU")
        if parts.grad_accum_steps != 1 or parts.accelerator.num_processes != 1:
            raise UserError("graphed: one process without gradient accumulation only")
        self.model = parts.accelerator.unwrap_model(parts.model, keep_fp32_wrapper=False).train()
        # Compiled on the first warm-up call; its guards are checked once, at capture, never at a replay.
        self.forward = torch.compile(self.model, dynamic=False) if compile_model else self.model
        self.input_name = parts.input_name
        group = parts.optimizer.param_groups[0]
        self.optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=group["lr"],
                                          betas=group["betas"], eps=group["eps"], fused=True, capturable=True)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(parts.accelerator.mixed_precision)
        # Static inputs, recorded once: every training batch has this shape (epochs are cut to whole batches).
        examples = parts.train_loader.dataset.__getitems__(list(range(parts.global_batch_size)))
        self.inputs, self.labels = (t.to(parts.accelerator.device).clone() for t in examples)
        saved = [t.detach().clone() for t in self._state()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.optimizer.zero_grad(set_to_none=True)
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for tensor, value in zip(self._state(), saved):
                tensor.copy_(value)  # in place: the graph records these addresses
            for state in self.optimizer.state.values():
                for value in state.values():
                    value.zero_()  # Adam's moments and step counts as before any step
        self.optimizer.zero_grad(set_to_none=True)  # the graph's backward makes the gradients, in its own memory
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.stats = self._step()

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.inputs.copy_(inputs, non_blocking=True)
        self.labels.copy_(labels, non_blocking=True)
        self.graph.replay()
        return self.stats.clone()  # the next replay overwrites the graph's own

    def _state(self) -> list[torch.Tensor]:
        return [*self.model.parameters(), *self.model.buffers()]

    def _autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.dtype, cache_enabled=False)

    def _step(self) -> torch.Tensor:
        with self._autocast():
            logits = self.forward(**{self.input_name: self.inputs})
            loss = F.cross_entropy(logits, self.labels)
        stats = step_figures(loss, logits, self.labels)
        loss.backward()
        self.optimizer.step()
        return stats


def train_graphed(parts, step: GraphedStep, num_steps: int, epoch: int = 1) -> list[torch.Tensor]:
    """``num_steps`` replays of ``step`` over the trainer's loader, in the trainer's data order; each step's
    figures as ``trainer_parts.train`` returns them."""
    parts.train_loader.set_epoch(epoch)
    stats = []
    for inputs, labels in parts.train_loader:
        stats.append(step(inputs, labels))
        if len(stats) == num_steps:
            break
    assert len(stats) == num_steps, f"the loader ran out after {len(stats)} steps"
    return stats
