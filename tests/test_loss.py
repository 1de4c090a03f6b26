"""The chunked language-model loss against `F.cross_entropy` on an fp32 copy of the logits.

Loss and gradient must agree to 1e-6 whether the logits are fp32 or bf16 and
however the tokens fall into chunks (one chunk, several, a short last one),
and the forward pass must keep no fp32 copy of the logits for backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from atoll.trainer.loss import lm_loss

B, S, V = 3, 7, 50  # 21 tokens


def logits_and_targets(dtype: torch.dtype):
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(B, S, V, generator=generator)).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (B, S), generator=generator)
    return logits, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows_per_chunk", [1, 4, 21, 1000])  # 21 chunks, 5 (last short), 1, 1
def test_loss_and_gradient_match_cross_entropy(dtype, rows_per_chunk):
    logits, targets = logits_and_targets(dtype)
    want = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    want.backward()
    want_grad, logits.grad = logits.grad, None
    got = lm_loss(logits, targets, chunk_bytes=4 * V * rows_per_chunk)
    got.backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert logits.grad.dtype == dtype
    torch.testing.assert_close(logits.grad.float(), want_grad.float(), rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # evaluation takes the same value
        torch.testing.assert_close(lm_loss(logits, targets, chunk_bytes=4 * V * rows_per_chunk), want,
                                   rtol=1e-6, atol=0)


def test_forward_keeps_no_fp32_copy_of_the_logits():
    """What autograd saves for backward: the bf16 logits (views of them) and the targets;
    F.cross_entropy on `logits.float()` saves a full fp32 log-softmax."""
    logits, targets = logits_and_targets(torch.bfloat16)

    def saved_fp32_elements(loss_fn) -> int:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss_fn()
        return sum(t.numel() for t in saved if t.dtype == torch.float32)

    assert saved_fp32_elements(lambda: F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())) >= B * S * V
    assert saved_fp32_elements(lambda: lm_loss(logits, targets, chunk_bytes=4 * V * 4)) == 0


@pytest.mark.gpu
def test_cuda_peak_memory_below_the_fp32_copy():
    """On a GPU, bf16 logits of 8192 tokens × 50304: forward and backward of the chunked loss
    peak at under 60% of what F.cross_entropy on an fp32 copy adds (about 4 vs 10 bytes per
    logit), with the same loss."""
    tokens, vocab = 8192, 50304
    generator = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(1, tokens, vocab, device="cuda", generator=generator).bfloat16().requires_grad_()
    targets = torch.randint(0, vocab, (1, tokens), device="cuda", generator=generator)

    def peak_added(loss_fn) -> tuple[int, torch.Tensor]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = loss_fn()
        loss.backward()
        logits.grad = None
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, loss.detach()

    old_peak, want = peak_added(lambda: F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()))
    new_peak, got = peak_added(lambda: lm_loss(logits, targets))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    assert new_peak < 0.6 * old_peak, (new_peak, old_peak)
