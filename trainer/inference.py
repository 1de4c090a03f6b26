"""Use a trained checkpoint from Python: load it as one model on one device, and generate.

    from atoll.trainer.inference import generate, load_model, load_tokenizer
    model = load_model("runs/default")          # a run, checkpoints or step folder
    tokenizer = load_tokenizer("runs/default")  # what the run's token ids mean
    print(generate(model, "def main(", 40, tokenizer=tokenizer))

`load_model` takes any checkpoint atoll writes, under any layout it was saved
with (dp, ep, pp, FSDP or DDP; DiLoCo islands give their global parameters),
reading the tensors as `atoll ckpt export` does (checkpoint/tools.py) and
building the single-device `Transformer` from the checkpoint's own recipe.
`load_tokenizer` gives the tokenizer the hf export writes next to the model
(checkpoint/hf_tokenizer.py). Generation recomputes the whole sequence for
every new token: a reference for checks and small experiments, not a server.

This module knows no process groups and reads no tensors itself: it asks
checkpoint/tools.py for the verified tensors and the manifest for the recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from atoll.checkpoint.hf_tokenizer import byte_level_tokenizer, token_ids_of
from atoll.checkpoint.manifest import CheckpointError, read_manifest
from atoll.checkpoint.store import resolve_checkpoint
from atoll.checkpoint.tools import model_weights
from atoll.trainer.config import model_config, recipe_from_dict
from atoll.trainer.model import Transformer
from atoll.trainer.data_cache import load_tokenizer as load_training_tokenizer


def load_model(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> Transformer:
    """The checkpoint's model (step, checkpoints or run folder; every file verified) as a
    single-device `Transformer` in fp32 and eval mode."""
    manifest, weights = model_weights(Path(path))
    model = Transformer(model_config(recipe_from_dict(manifest["recipe"])))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint at {path} does not fit the model of its own recipe: "
                              f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.to(device).eval()


def load_tokenizer(path: Union[str, Path]):
    """The `tokenizers.Tokenizer` of the checkpoint's token ids: byte-level for the `stdlib`
    and `folder` sources (and `dataset` without a tokenizer), the `data.tokenizer` of `text`
    and `dataset`; None where the checkpoint does not say (`tokens`, imported weights)."""
    data = read_manifest(resolve_checkpoint(Path(path)))["recipe"].get("data") or {}
    ids = token_ids_of(data)
    if ids == "bytes":
        return byte_level_tokenizer()
    if ids == "tokenizer" and data.get("tokenizer"):
        return load_training_tokenizer(data["tokenizer"], CheckpointError)
    return None


@torch.no_grad()
def generate(model: Transformer, prompt: Union[str, Sequence[int], torch.Tensor], max_new_tokens: int, *,
             tokenizer=None, temperature: float = 0.0, top_k: Optional[int] = None,
             seed: Optional[int] = None) -> Union[str, list[int], torch.Tensor]:
    """`prompt` followed by `max_new_tokens` tokens.

    Greedy (the argmax) when `temperature` is 0, else sampled from softmax(logits /
    temperature), restricted to the `top_k` likeliest tokens when given, from a generator
    seeded with `seed` (the same seed gives the same tokens). The answer has the prompt's
    kind: text (encoded and decoded with `tokenizer`, without special tokens), a list of
    ids, or a [B, S] tensor of ids (every row continued).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, not {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, not {top_k}")
    device = next(model.parameters()).device
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs the checkpoint's tokenizer: "
                             "generate(model, text, n, tokenizer=load_tokenizer(path))")
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        tokens_BS = torch.tensor([ids], dtype=torch.long, device=device)
    else:
        tokens_BS = torch.as_tensor(prompt, dtype=torch.long, device=device)
        tokens_BS = tokens_BS.unsqueeze(0) if tokens_BS.dim() == 1 else tokens_BS
    if tokens_BS.shape[1] == 0:
        raise ValueError("the prompt has no tokens")
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()  # a fresh draw, leaving torch's global generator alone
    else:
        generator.manual_seed(seed)
    for _ in range(max_new_tokens):
        logits_BV = model(tokens_BS)[0][:, -1].float()
        tokens_BS = torch.cat([tokens_BS, next_tokens(logits_BV, temperature, top_k, generator)], dim=1)
    if isinstance(prompt, str):
        return tokenizer.decode(tokens_BS[0].tolist(), skip_special_tokens=False)
    if isinstance(prompt, torch.Tensor):
        return tokens_BS if prompt.dim() == 2 else tokens_BS[0]
    return tokens_BS[0].tolist()


def next_tokens(logits_BV: torch.Tensor, temperature: float, top_k: Optional[int],
                generator: torch.Generator) -> torch.Tensor:
    """[B, 1] next token per row: argmax at temperature 0, else a draw from the tempered
    (and top-k restricted) distribution."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1, keepdim=True)
    logits_BV = logits_BV / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_BV = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_BV, float("-inf"))
    return torch.multinomial(logits_BV.softmax(dim=-1), 1, generator=generator)
