"""The language-model loss, without a full-vocabulary fp32 copy of the logits.

`F.cross_entropy(logits.float())` keeps an fp32 copy of every token's logits
(and its log-softmax) alive from the forward pass to the end of backward:
for 16k tokens of a 50k vocabulary that is 3.3 GB beside the bf16 logits.
`lm_loss` instead cuts the tokens into chunks and takes each chunk's fp32
cross-entropy under activation checkpointing: the forward keeps only the
chunk's loss, and backward recomputes one chunk's fp32 log-softmax at a time.
The value is the mean over all tokens, as `F.cross_entropy` gives it.

This module knows tensors only: no model, no process groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# The fp32 copy of one chunk's logits is kept under this many bytes.
CHUNK_BYTES = 128 * 2 ** 20


def lm_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor,
            chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Mean next-token cross-entropy of `logits_BSV` (any float dtype) against `targets_BS`,
    computed in fp32."""
    logits_TV = logits_BSV.flatten(0, 1)
    targets_T = targets_BS.flatten()
    rows = max(1, chunk_bytes // (4 * logits_TV.shape[-1]))
    total = None
    # split (not slicing): backward concatenates the chunks' gradients once.
    for logits_CV, targets_C in zip(logits_TV.split(rows), targets_T.split(rows)):
        if logits_CV.requires_grad:
            loss = checkpoint(_summed_cross_entropy, logits_CV, targets_C, use_reentrant=False)
        else:
            loss = _summed_cross_entropy(logits_CV, targets_C)
        total = loss if total is None else total + loss
    return total / targets_T.numel()


def _summed_cross_entropy(logits_CV: torch.Tensor, targets_C: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_CV.float(), targets_C, reduction="sum")
