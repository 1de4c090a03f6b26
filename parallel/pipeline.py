"""Pipeline parallelism: the model split into stages over the "pp" mesh dim.

`split_model` deep-copies the single-device model once per stage this rank
runs and deletes what the stage does not own, so every parameter keeps its
original name (checkpoints stay universal): embeddings live on the first
stage, the final norm and output head on the last. Layers are balanced by
count; `parallel.pp_first_last_layers` gives the first and last stage fewer.
With `interleaved_1f1b` each rank runs `parallel.pp_virtual_stages` stages,
round-robin (rank r holds stages r, r+pp, ...).

Each stage's forward runs in the run's precision (`forward_context`: autocast,
or nothing where FSDP casts the parameters), as the loop without a pipeline
does; the loss casts the logits to fp32 itself.

MoE auxiliary losses cannot ride to the last stage as a loss term, so each
stage attaches its layers' auxiliary loss to its output with `AttachAux`:
the forward value is unchanged and backward gives the auxiliary loss the
gradient a loss term would get.

Gradient scale: the schedules come from torch.distributed.pipelining with
their own gradient scaling off. Left on, a schedule divides every
parameter's gradient by the microbatch count after each `step()`, i.e. also
what earlier data micro-batches of the same optimizer step accumulated, so
with `data.grad_accum` > 1 early micro-batches would weigh less. Instead
every microbatch's loss and auxiliary loss enter backward scaled by
1 / (microbatches × data micro-batches of the step): the gradient is the
step's mean, as in the loop without a pipeline.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, ContextManager, Optional

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (Schedule1F1B, ScheduleGPipe,
                                                     ScheduleInterleaved1F1B)

from atoll.parallel.expert_parallel import moe_layers

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}


class PipelineError(ValueError):
    """The pipeline layout cannot work; one line naming the recipe key."""


def stage_layers(num_layers: int, num_stages: int, first_last: Optional[int] = None) -> list[list[int]]:
    """Contiguous layer ids per stage: balanced by count, or `first_last` on the end stages."""
    if num_stages > num_layers:
        raise PipelineError(f"{num_stages} pipeline stages need at least as many layers, "
                            f"model.layers={num_layers}")
    if first_last is not None:
        middle_layers = num_layers - 2 * first_last
        if first_last < 1 or middle_layers < num_stages - 2:
            raise PipelineError(f"parallel.pp_first_last_layers={first_last} leaves too few layers "
                                f"for {num_stages - 2} middle stages")
        sizes = [first_last] + _balanced(middle_layers, num_stages - 2) + [first_last]
    else:
        sizes = _balanced(num_layers, num_stages)
    bounds = [sum(sizes[:i]) for i in range(num_stages + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(num_stages)]


def _balanced(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


class AttachAux(torch.autograd.Function):
    """Identity on `x` whose backward also gives `aux` the gradient of a loss term
    weighted `scale`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.aux_shape, ctx.aux_dtype, ctx.scale = aux.shape, aux.dtype, scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor):
        # In aux's dtype (fp32), not x's: under bf16 the scale would be rounded.
        return grad_x, torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=grad_x.device), None


class StageModule(nn.Module):
    """One pipeline stage: a pruned copy of the model, with its aux loss attached.

    `part` keeps the original parameter names (`part` is never what the
    checkpointer sees: it is handed `part` itself, not this wrapper).

    The schedule may run extra forwards on placeholder tensors before a
    step's real ones, to infer shapes (torch 2.13: on its first step, with
    grad, and again after an eval; torch 2.11: once, under no_grad). So each training forward records its aux loss and takes its MoE
    layers' loads, and `finish_step` keeps only the step's last
    `microbatches` records: those are the real microbatches.
    """

    def __init__(self, part: nn.Module,
                 forward_context: Callable[[], ContextManager] = contextlib.nullcontext):
        super().__init__()
        self.part = part
        self.forward_context = forward_context
        self.moe = [moe for _, moe in moe_layers(part)]
        # Per training forward: (aux loss, [(load_E, dropped) per MoE layer]).
        self.records: list[tuple[torch.Tensor, list]] = []
        self.carried: list = []  # loads of earlier micro-batches of this optimizer step
        self.grad_scale = 1.0  # the weight of one microbatch's loss terms in the step's gradient

    def start_step(self) -> None:
        """Set aside the loads counted so far, so no forward record holds them."""
        self.carried = [moe.take_load() for moe in self.moe]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.forward_context():
            out, aux = self.part(x)
        if self.training and not aux.is_meta:  # shape inference may run under no_grad
            self.records.append((aux.detach(), [moe.take_load() for moe in self.moe]))
        if aux.requires_grad:
            out = AttachAux.apply(out, aux, self.grad_scale)
        return out

    def finish_step(self, microbatches: int) -> torch.Tensor:
        """Mean aux loss of the step's microbatches; their MoE loads go back to the layers."""
        if len(self.records) < microbatches:
            raise RuntimeError(f"pipeline stage ran {len(self.records)} training forwards "
                               f"for {microbatches} microbatches")
        real = self.records[-microbatches:]
        self.records = []
        for index, moe in enumerate(self.moe):
            for load_E, dropped in [self.carried[index]] + [loads[index] for _, loads in real]:
                moe.load_E += load_E
                moe.dropped += dropped
        self.carried = []
        return torch.stack([aux for aux, _ in real]).mean()


def split_model(model: nn.Module, stage_ids: list[int], layers_per_stage: list[list[int]]) -> list[nn.Module]:
    """Pruned copies of `model` for the given stages (original names kept)."""
    num_stages = len(layers_per_stage)
    parts = []
    for stage in stage_ids:
        part = copy.deepcopy(model)
        keep = {str(i) for i in layers_per_stage[stage]}
        for name in list(part.layers.keys()):
            if name not in keep:
                del part.layers[name]
        if stage != 0:
            part.tok_embeddings = None
        if stage != num_stages - 1:
            part.norm = None
            part.output = None
        parts.append(part)
    return parts


def stages_of_rank(pp_rank: int, pp: int, virtual: int) -> list[int]:
    return [pp_rank + i * pp for i in range(virtual)]


def build_schedule(wrappers: list[nn.Module], stage_ids: list[int], num_stages: int, schedule: str,
                   microbatches: int, loss_fn: Callable, device: torch.device, group) -> object:
    stages = [PipelineStage(w, stage_id, num_stages, device, group=group)
              for w, stage_id in zip(wrappers, stage_ids)]
    cls = SCHEDULES[schedule]
    # scale_grads=False: the loss terms carry the step's weights (see the module docstring).
    if cls is ScheduleInterleaved1F1B:
        return cls(stages, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(stages[0], n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)


class PipelineRunner:
    """Forward/backward of one step's micro-batches through this rank's stages.

    Each data micro-batch is split into `microbatches` pipeline microbatches;
    the schedule runs forward and backward, with each microbatch's loss terms
    weighted so that the gradients of a step's data micro-batches add up to
    their mean. Only the last stage sees the loss; only the first the tokens.
    """

    def __init__(self, train_modules: list[nn.Module], wrappers: list[StageModule],
                 stage_ids: list[int], num_stages: int, schedule: str, microbatches: int,
                 loss_fn: Callable, device: torch.device, group):
        self.wrappers = wrappers
        self.microbatches = microbatches
        self.is_first = 0 in stage_ids
        self.is_last = num_stages - 1 in stage_ids
        self.loss_fn = loss_fn
        self.device = device
        self.grad_scale = 1.0
        self.losses: list[torch.Tensor] = []  # unweighted, one per microbatch the schedule ran
        self.schedule = build_schedule(train_modules, stage_ids, num_stages, schedule, microbatches,
                                       self._weighted_loss, device, group)

    def _weighted_loss(self, output, target) -> torch.Tensor:
        loss = self.loss_fn(output, target)
        self.losses.append(loss.detach())
        return loss * self.grad_scale

    def _run(self, run, inputs_BS, targets_BS) -> list[torch.Tensor]:
        self.losses = []
        args = (inputs_BS,) if self.is_first else ()
        kwargs = {"target": targets_BS} if self.is_last else {}
        run(*args, **kwargs)
        # The schedule's shape inference (first step, after an eval) may also take the loss
        # of placeholder outputs: the real microbatches are the last ones.
        losses, self.losses = self.losses[-self.microbatches:] if self.is_last else [], []
        return losses

    def forward_backward(self, inputs_BS, targets_BS, micro_batches: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss over microbatches on the last stage else 0, this stage's mean aux loss).

        `micro_batches` is the number of data micro-batches in the optimizer step: each
        adds its share, 1 / micro_batches of their mean, to the gradients."""
        self.grad_scale = 1.0 / (self.microbatches * micro_batches)
        for wrapper in self.wrappers:
            wrapper.start_step()
            wrapper.grad_scale = self.grad_scale
        losses = self._run(self.schedule.step, inputs_BS, targets_BS)
        loss = torch.stack(losses).mean().detach() if losses else torch.zeros((), device=self.device)
        # Mean over microbatches of each stage's aux loss, summed over this rank's stages.
        aux = sum((w.finish_step(self.microbatches) for w in self.wrappers), torch.zeros((), device=self.device))
        return loss, aux

    @torch.no_grad()
    def evaluate(self, inputs_BS, targets_BS) -> torch.Tensor:
        self.grad_scale = 1.0
        losses = self._run(self.schedule.eval, inputs_BS, targets_BS)
        return torch.stack(losses).mean() if losses else torch.zeros((), device=self.device)
