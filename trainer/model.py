"""Decoder-only transformer (Llama-style) with optional MoE feed-forwards.

Single-device code: a plain `nn.Module` built from a `ModelConfig` dataclass.
It must not know about process groups, DTensor, ranks or meshes; data, expert
and pipeline parallelism are applied from outside by atoll.parallel. To keep
that possible:
- `layers` is an `nn.ModuleDict` keyed "0", "1", ... so a pipeline stage can
  delete layers and keep the original parameter names;
- `tok_embeddings`, `norm` and `output` may be set to None, and `forward` then
  takes or returns the hidden state;
- `init_weights` draws each parameter from a generator keyed by (seed, name),
  so the values never depend on construction order or on which parameters a
  process holds: a model built on the meta device, sharded, then materialised
  gets the same values, each rank copying only its shard.

Shapes: B batch, S sequence, D model dim, H heads, Hd head dim, V vocab.
"""

from __future__ import annotations

import math
import zlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from atoll.trainer.config import ModelConfig, ffn_hidden
from atoll.trainer.moe import ExpertKinds, FeedForward, MoE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_f = x.float()  # normalise in fp32 even under bf16 training
        x_f = x_f * torch.rsqrt(x_f.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return x_f.type_as(x) * self.weight


class RotaryEmbedding(nn.Module):
    """cos/sin tables, grown lazily to the longest sequence seen (no max length in config).

    Uses the rotate-half layout (as Hugging Face Llama does), so exported q/k
    weights need no permutation.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("cos_SHd", torch.empty(0, head_dim), persistent=False)
        self.register_buffer("sin_SHd", torch.empty(0, head_dim), persistent=False)

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cos_SHd.shape[0] < seq_len or self.cos_SHd.device != device:
            inv_freq = 1.0 / self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)
            angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
            angles = torch.cat([angles, angles], dim=-1)
            self.cos_SHd = angles.cos().float().to(device)
            self.sin_SHd = angles.sin().float().to(device)
        return self.cos_SHd[:seq_len], self.sin_SHd[:seq_len]


def apply_rotary(x_BHSHd: torch.Tensor, cos_SHd: torch.Tensor, sin_SHd: torch.Tensor) -> torch.Tensor:
    x_f = x_BHSHd.float()
    x1, x2 = x_f.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x_f * cos_SHd + rotated * sin_SHd).type_as(x_BHSHd)


class Attention(nn.Module):
    """Causal self-attention; with kv_heads < heads (grouped-query attention) each group of
    heads // kv_heads consecutive query heads shares one key/value head."""

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.kv_heads = kv_heads or heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, self.kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, self.kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x_BSD: torch.Tensor, cos_SHd: torch.Tensor, sin_SHd: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape

        def split_heads(t_BSX: torch.Tensor, heads: int) -> torch.Tensor:
            return t_BSX.view(B, S, heads, self.head_dim).transpose(1, 2)

        q_BHSHd = apply_rotary(split_heads(self.wq(x_BSD), self.heads), cos_SHd, sin_SHd)
        k_BGSHd = apply_rotary(split_heads(self.wk(x_BSD), self.kv_heads), cos_SHd, sin_SHd)
        v_BGSHd = split_heads(self.wv(x_BSD), self.kv_heads)
        if self.kv_heads != self.heads:
            k_BGSHd = k_BGSHd.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v_BGSHd = v_BGSHd.repeat_interleave(self.heads // self.kv_heads, dim=1)
        o_BHSHd = F.scaled_dot_product_attention(q_BHSHd, k_BGSHd, v_BGSHd, is_causal=True)
        return self.wo(o_BHSHd.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)); returns (x, aux_loss,
    router logits), the logits only where the next layer's router adds them (gating residual)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg.dim, cfg.heads, cfg.kv_heads)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.moe.num_experts == 0:
            self.feed_forward = FeedForward(cfg.dim, ffn_hidden(cfg))
        else:
            self.feed_forward = MoE(cfg.dim, ffn_hidden(cfg), cfg.moe)

    def forward(self, x_BSD: torch.Tensor, cos_SHd: torch.Tensor, sin_SHd: torch.Tensor,
                router_logits_TE: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        x_BSD = x_BSD + self.attention(self.attention_norm(x_BSD), cos_SHd, sin_SHd)
        if isinstance(self.feed_forward, MoE):
            ff_BSD, aux_loss, router_logits_TE = self.feed_forward(self.ffn_norm(x_BSD), router_logits_TE)
        else:
            ff_BSD, aux_loss = self.feed_forward(self.ffn_norm(x_BSD)), torch.zeros((), device=x_BSD.device)
        return x_BSD + ff_BSD, aux_loss, router_logits_TE


# Parameter-name fragments that wrappers (activation checkpointing, torch.compile,
# FSDP1) insert; init keys on the name a checkpoint would use.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def canonical_name(name: str) -> str:
    for fragment in _WRAPPER_PREFIXES:
        name = name.replace(fragment, "")
    return name


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rope = RotaryEmbedding(cfg.dim // cfg.heads, cfg.rope_theta)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output: nn.Linear | None = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:  # one matrix, registered once (as tok_embeddings.weight)
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, S] (or hidden [B, S, D] without tok_embeddings) -> (logits_BSV, aux_loss)."""
        h_BSD = self.tok_embeddings(tokens_BS) if self.tok_embeddings is not None else tokens_BS
        cos_SHd, sin_SHd = self.rope(h_BSD.shape[1], h_BSD.device)
        aux_loss = torch.zeros((), device=h_BSD.device)
        router_logits_TE = None  # the gating residual's carry from one MoE layer to the next
        if self.cfg.moe.num_experts and self.cfg.moe.gating_residual:
            # The first layer adds zeros. Every block then sees a tensor that requires grad
            # whenever grad is on, as the later layers' logits do: one compiled graph for all.
            B, S = h_BSD.shape[:2]
            router_logits_TE = h_BSD.new_zeros(B * S, ExpertKinds.of(self.cfg.moe).total, dtype=torch.float32)
            router_logits_TE.requires_grad_(torch.is_grad_enabled())
        for layer in self.layers.values():
            h_BSD, layer_aux, router_logits_TE = layer(h_BSD, cos_SHd, sin_SHd, router_logits_TE)
            aux_loss = aux_loss + layer_aux
        if self.norm is not None:
            h_BSD = self.norm(h_BSD)
        logits_BSV = self.output(h_BSD) if self.output is not None else h_BSD
        return logits_BSV, aux_loss

    def init_std(self, name: str) -> float | None:
        """Std of the normal a parameter is drawn from; None means ones (norm weights)."""
        module_name, _, leaf = canonical_name(name).rpartition(".")
        if module_name.endswith("norm"):
            return None
        # Output-side projections feed the residual stream: scale down with depth (GPT-2).
        if module_name.endswith(("attention.wo", "w2")) or leaf == "w2":
            return 0.02 / math.sqrt(2 * self.cfg.layers)
        return 0.02

    def initial_value(self, name: str, shape: torch.Size, seed: int) -> torch.Tensor:
        """The full fp32 CPU value of parameter `name` (parallel code may slice it)."""
        std = self.init_std(name)
        if std is None:
            return torch.ones(shape)
        # The CPU generator (mt19937) keeps only the low 32 bits of its seed, so
        # `(seed << 32) | crc` would ignore the seed: hash both into 32 bits instead.
        key = zlib.crc32(f"{seed}:{canonical_name(name)}".encode())
        generator = torch.Generator().manual_seed(key)
        return torch.empty(shape).normal_(0.0, std, generator=generator)

    @torch.no_grad()
    def init_weights(self, seed: int,
                     copy_value: Callable[[nn.Parameter, torch.Tensor], None] | None = None) -> None:
        """Every parameter to its `initial_value`, every buffer to its value at construction.

        `copy_value(param, full)` writes a parameter's full value into it; parallel
        code passes one that keeps only its shard. One full value is alive at a time,
        so a model built on the meta device and materialised with `to_empty` is
        initialised without ever holding all of it on one device.
        """
        copy_value = copy_value or (lambda param, full: param.copy_(full))
        for name, param in self.named_parameters():
            copy_value(param, self.initial_value(name, param.shape, seed))
        # `to_empty` leaves buffers uninitialised; the routing counters and the router's
        # bias start at zero, the rope tables empty (they grow on first use).
        for name, buffer in self.named_buffers():
            if not name.startswith("rope."):
                buffer.zero_()
        self.rope.cos_SHd = self.rope.cos_SHd.new_empty(0, self.rope.head_dim)
        self.rope.sin_SHd = self.rope.sin_SHd.new_empty(0, self.rope.head_dim)
        # `to_empty` gives each module its own new parameter: tie the head to the embedding again.
        if self.cfg.tie_embeddings and self.output is not None and self.tok_embeddings is not None:
            self.output.weight = self.tok_embeddings.weight


@torch.no_grad()
def greedy_generate(model: Transformer, tokens_BS: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """`tokens_BS` followed by `new_tokens` tokens, each the argmax of the next-token logits
    (the whole sequence is recomputed per token: a reference, not a server)."""
    for _ in range(new_tokens):
        logits_BSV, _ = model(tokens_BS)
        tokens_BS = torch.cat([tokens_BS, logits_BSV[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return tokens_BS


def count_params(model: nn.Module) -> dict[str, int]:
    """Parameter counts for throughput/TFLOPs reporting.

    total: every parameter. active_per_token: routed experts count top_k/E of
    their size, at most (zero-computation experts may take some of the top-k
    slots); the router and shared expert are fully active. embedding:
    the input embedding table, which costs no matmul FLOPs (subtract it for 6N).
    """
    total = sum(p.numel() for p in model.parameters())
    inactive = 0.0
    for module in model.modules():
        if isinstance(module, MoE):
            expert_params = sum(p.numel() for p in module.experts.parameters())
            inactive += expert_params * (1 - min(module.top_k, module.num_experts) / module.num_experts)
    embedding = getattr(model, "tok_embeddings", None)
    return {
        "total": total,
        "active_per_token": round(total - inactive),
        "embedding": embedding.weight.numel() if embedding is not None else 0,
    }
