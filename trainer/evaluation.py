"""The validation pass: the eval losses of a trainer's held-out windows.

`evaluate(trainer)` runs every validation set the trainer built (one, or one per
mixture source: trainer/data.py `validation_sets`) without gradients, through
the pipeline runner when there is one, and averages over the pipeline stages
and the data-parallel ranks. It reads the trainer's modules and mesh; it
changes nothing but their train/eval mode, which it restores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from atoll.trainer.loss import lm_loss

if TYPE_CHECKING:
    from atoll.trainer.train import Trainer


@torch.no_grad()
def evaluate(trainer: "Trainer") -> dict[str, float]:
    """`eval_loss` on the validation set; with a mixture, `eval_loss.<name>` per source and
    `eval_loss` their mean weighted by the mixture's shares."""
    modules = trainer.runner.wrappers if trainer.runner else [trainer.train_module]
    for module in modules:
        module.eval()
    means = []
    for _, _, batches in trainer.val:
        losses = []
        for inputs_BS, targets_BS in batches:
            inputs_BS, targets_BS = trainer.to_device(inputs_BS), trainer.to_device(targets_BS)
            if trainer.runner is not None:
                losses.append(float(trainer.runner.evaluate(inputs_BS, targets_BS)))
                continue
            with trainer.precision.forward_context():
                logits_BSV, _ = trainer.train_module(inputs_BS)
            losses.append(float(lm_loss(logits_BSV, targets_BS)))
        means.append(sum(losses) / len(losses))
    for module in modules:
        module.train()
    means = trainer.mesh.all_reduce_mean(trainer.mesh.sum_over_stages(means))
    if len(trainer.val) == 1 and trainer.val[0][0] is None:
        return {"eval_loss": means[0]}
    per_source = {f"eval_loss.{name}": mean for (name, _, _), mean in zip(trainer.val, means)}
    return {"eval_loss": sum(share * mean for (_, share, _), mean in zip(trainer.val, means)), **per_source}
