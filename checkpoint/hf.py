"""Hugging Face transformers folders: atoll models as native architectures, and back.

Export picks the transformers architecture that computes exactly atoll's
function for the recipe's `model` section and renames (and, for experts,
splits) the tensors into that architecture's checkpoint names:

- dense                                   -> LlamaForCausalLM
- softmax top-k, renormalised, no shared
  expert, no selection bias               -> MixtralForCausalLM
- softmax top-k with a shared expert or
  without renormalisation                 -> Qwen2MoeForCausalLM (norm_topk_prob;
  its shared expert is gated by sigmoid(w·x): w = 0 gates by exactly 1/2, so the
  shared expert's down projection is written doubled, a power-of-two scaling
  that changes no rounding)
- sigmoid scores (with or without the aux-free selection bias, which becomes
  `e_score_correction_bias`)              -> Glm4MoeForCausalLM (one group, full
  rotary, no qk-norm, routed scaling 1)

Anything else (capacity drops, group-limited routing, softmax scores with a
selection bias) has no equivalent and stops with the recipe key that has none.
Import reads those four architectures (safetensors only, never pickle) into
atoll's names and the matching `model` recipe, refusing what atoll cannot
represent (sliding windows, biases, gated shared experts, ...).

This module moves tensors and JSON; it knows neither the model classes nor
transformers itself, so export and import need no transformers install.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from atoll.checkpoint.manifest import CheckpointError

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # as save_pretrained's max_shard_size="5GB" used to be
EXPORT_FILE_MODE = 0o644  # whoever uses the folder reads it, whatever the writer's umask or library
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# atoll name (after `model.`) -> transformers name; {i} is the layer.
_COMMON = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}
_DENSE_MLP = {
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# Per architecture: router weight, per-expert (gate, up, down) names, shared expert block.
_MOE = {
    "mixtral": {"router": "model.layers.{i}.block_sparse_moe.gate.weight",
                "experts": ("model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
                            "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",
                            "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight"),
                "shared": None},
    "qwen2_moe": {"router": "model.layers.{i}.mlp.gate.weight",
                  "experts": ("model.layers.{i}.mlp.experts.{e}.gate_proj.weight",
                              "model.layers.{i}.mlp.experts.{e}.up_proj.weight",
                              "model.layers.{i}.mlp.experts.{e}.down_proj.weight"),
                  "shared": "model.layers.{i}.mlp.shared_expert"},
    "glm4_moe": {"router": "model.layers.{i}.mlp.gate.weight",
                 "experts": ("model.layers.{i}.mlp.experts.{e}.gate_proj.weight",
                             "model.layers.{i}.mlp.experts.{e}.up_proj.weight",
                             "model.layers.{i}.mlp.experts.{e}.down_proj.weight"),
                 "shared": "model.layers.{i}.mlp.shared_experts"},
}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM",
                 "qwen2_moe": "Qwen2MoeForCausalLM", "glm4_moe": "Glm4MoeForCausalLM"}


# ---------------------------------------------------------------- which architecture

def architecture_for(model: dict) -> str:
    """The transformers model_type that computes exactly what this `model` recipe does."""
    moe = model.get("moe") or {}
    if not moe.get("num_experts"):
        return "llama"
    for key in ("zero_experts", "copy_experts", "constant_experts", "gating_residual"):
        if moe.get(key):
            raise CheckpointError(f"model.moe.{key}={str(moe[key]).lower()} has no transformers equivalent "
                                  "(no architecture has zero-computation experts or gating residuals)")
    if moe.get("capacity_factor"):
        raise CheckpointError(f"model.moe.capacity_factor={moe['capacity_factor']} has no transformers "
                              "equivalent (no architecture drops assignments over capacity)")
    if (moe.get("groups") or 0) > 1:
        raise CheckpointError(f"model.moe.groups={moe['groups']} has no transformers equivalent (atoll picks "
                              "top_k/groups experts in every group; DeepSeek-style routing picks whole groups)")
    if moe.get("score_func", "softmax") == "sigmoid":
        return "glm4_moe"
    if moe.get("balance") == "aux_free":
        raise CheckpointError("model.moe.balance=aux_free with score_func=softmax has no transformers "
                              "equivalent (a selection bias exists only with sigmoid scores)")
    if moe.get("shared_expert") or not moe.get("renormalize", True):
        return "qwen2_moe"
    return "mixtral"


def hf_config(model: dict, arch: str, hidden: int, expert_hidden: int) -> dict:
    """config.json for `arch`; every option that changes the function is set explicitly."""
    moe = model.get("moe") or {}
    heads, dim = model["heads"], model["dim"]
    rope = {"rope_type": "default", "rope_theta": float(model["rope_theta"])}
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]], "model_type": arch,
        "vocab_size": model["vocab_size"], "hidden_size": dim, "num_hidden_layers": model["layers"],
        "num_attention_heads": heads, "num_key_value_heads": model.get("kv_heads") or heads,
        "head_dim": dim // heads, "hidden_act": "silu", "rms_norm_eps": float(model["norm_eps"]),
        "rope_theta": float(model["rope_theta"]), "rope_parameters": rope,
        "max_position_embeddings": 4096, "tie_word_embeddings": bool(model.get("tie_embeddings")),
        "intermediate_size": hidden, "attention_dropout": 0.0, "torch_dtype": "float32",
        "dtype": "float32", "use_cache": True,
    }
    if arch == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    elif arch == "mixtral":
        config.update(num_local_experts=moe["num_experts"], num_experts_per_tok=moe["top_k"],
                      intermediate_size=expert_hidden, sliding_window=None, router_jitter_noise=0.0,
                      router_aux_loss_coef=0.0, output_router_logits=False)
    elif arch == "qwen2_moe":
        config.update(num_experts=moe["num_experts"], num_experts_per_tok=moe["top_k"],
                      moe_intermediate_size=expert_hidden, norm_topk_prob=bool(moe.get("renormalize", True)),
                      shared_expert_intermediate_size=expert_hidden if moe.get("shared_expert") else 0,
                      qkv_bias=False, use_sliding_window=False, decoder_sparse_step=1, mlp_only_layers=[],
                      router_aux_loss_coef=0.0, output_router_logits=False)
    else:  # glm4_moe
        config.update(n_routed_experts=moe["num_experts"], num_experts_per_tok=moe["top_k"],
                      moe_intermediate_size=expert_hidden, n_shared_experts=1 if moe.get("shared_expert") else 0,
                      norm_topk_prob=bool(moe.get("renormalize", True)), routed_scaling_factor=1.0,
                      n_group=1, topk_group=1, first_k_dense_replace=0, use_qk_norm=False,
                      attention_bias=False, partial_rotary_factor=1.0,
                      rope_parameters={**rope, "partial_rotary_factor": 1.0})
    return config


# ---------------------------------------------------------------- export

def to_hf(weights: dict[str, torch.Tensor], model: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, transformers tensors) from atoll's model tensors (names without `model.`)."""
    arch = architecture_for(model)
    moe = model.get("moe") or {}
    out: dict[str, torch.Tensor] = {}
    names = {**_COMMON, **(_DENSE_MLP if arch == "llama" else {})}
    plan = _MOE.get(arch)
    expert_hidden = hidden = 0
    for name, tensor in weights.items():
        layer, pattern = _pattern(name)
        if pattern in names:
            if name == "output.weight" and model.get("tie_embeddings"):
                continue
            out[names[pattern].format(i=layer)] = tensor
            hidden = tensor.shape[0] if pattern == "layers.{i}.feed_forward.w1.weight" else hidden
        elif pattern == "layers.{i}.feed_forward.router.gate.weight":
            out[plan["router"].format(i=layer)] = tensor
        elif pattern == "layers.{i}.feed_forward.router.expert_bias_E":
            if arch == "glm4_moe":
                out[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"] = tensor.float()
            elif moe.get("balance") == "aux_free" or bool(tensor.any()):
                raise CheckpointError("model.moe.balance=aux_free with score_func=softmax has no "
                                      "transformers equivalent")
        elif pattern in ("layers.{i}.feed_forward.experts.w1", "layers.{i}.feed_forward.experts.w3",
                         "layers.{i}.feed_forward.experts.w2"):
            which = ("w1", "w3", "w2").index(pattern.rsplit(".", 1)[1])
            expert_hidden = tensor.shape[2] if which < 2 else expert_hidden
            for e in range(tensor.shape[0]):  # [E, D, H] / [E, H, D] -> nn.Linear's [out, in]
                out[plan["experts"][which].format(i=layer, e=e)] = tensor[e].t().contiguous()
        elif pattern.startswith("layers.{i}.feed_forward.shared_expert.") and plan["shared"]:
            proj = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}[pattern.split(".")[-2]]
            value = tensor * 2 if arch == "qwen2_moe" and proj == "down_proj" else tensor
            out[f"{plan['shared'].format(i=layer)}.{proj}.weight"] = value
            if arch == "qwen2_moe" and proj == "down_proj":  # sigmoid(0) = 1/2 undoes the doubling
                out[f"model.layers.{layer}.mlp.shared_expert_gate.weight"] = torch.zeros(1, tensor.shape[0])
        else:
            raise CheckpointError(f"model.{name} has no place in {ARCHITECTURES[arch]}")
    if arch == "qwen2_moe" and not moe.get("shared_expert"):
        for layer in range(model["layers"]):
            out[f"model.layers.{layer}.mlp.shared_expert_gate.weight"] = torch.zeros(1, model["dim"])
    return hf_config(model, arch, hidden or expert_hidden, expert_hidden), out


def _pattern(name: str) -> tuple[Optional[int], str]:
    match = re.match(r"layers\.(\d+)\.(.*)", name)
    return (int(match.group(1)), "layers.{i}." + match.group(2)) if match else (None, name)


def write_hf_folder(out: Path, config: dict, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """config.json, generation_config.json and the weights: one model.safetensors, or shards
    of at most `max_shard_bytes` with model.safetensors.index.json as save_pretrained writes."""
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    for stale in list(out.glob("model*.safetensors")) + [out / INDEX_NAME]:
        stale.unlink(missing_ok=True)
    files = [out / WEIGHTS_NAME] if len(shards) == 1 else \
        [out / f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    for path, shard in zip(files, shards):
        save_file(shard, str(path), metadata={"format": "pt", **metadata})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {name: path.name for path, shard in zip(files, shards) for name in shard}}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"_from_model_config": True, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    written = [*files, out / "config.json", out / "generation_config.json"]
    make_readable(written + ([out / INDEX_NAME] if len(shards) > 1 else []))
    return files


def make_readable(paths: list[Path]) -> None:
    """Give exported files EXPORT_FILE_MODE (safetensors writes its files owner-only)."""
    for path in paths:
        os.chmod(path, EXPORT_FILE_MODE)


# ---------------------------------------------------------------- import

def read_hf_folder(src: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, every tensor) of a transformers folder; safetensors only."""
    src = Path(src)
    try:
        config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{src} has no config.json (not a transformers model folder)") from None
    if (src / INDEX_NAME).exists():
        weight_map = json.loads((src / INDEX_NAME).read_text(encoding="utf-8"))["weight_map"]
        files = sorted({src / name for name in weight_map.values()})
    elif (src / WEIGHTS_NAME).exists():
        files = [src / WEIGHTS_NAME]
    else:
        pickled = [p.name for p in src.glob("*.bin")]
        raise CheckpointError(f"{src} has no {WEIGHTS_NAME}" + (f" (only {', '.join(pickled)}: pickled weights "
                              "are never loaded; convert them to safetensors)" if pickled else ""))
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return config, tensors


def from_hf(config: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(atoll `model` recipe, atoll model tensors without `model.`) from a transformers folder."""
    arch = config.get("model_type")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"model_type '{arch}' cannot be imported (known: {', '.join(ARCHITECTURES)})")
    _refuse_unrepresentable(config, arch, tensors)
    dim, heads, layers = config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]
    if config.get("head_dim") not in (None, dim // heads):
        raise CheckpointError(f"head_dim={config['head_dim']} differs from hidden_size/num_attention_heads="
                              f"{dim // heads}, which atoll's attention assumes")
    rope = config.get("rope_parameters") or {}
    model: dict[str, Any] = {
        "dim": dim, "layers": layers, "heads": heads,
        "kv_heads": config.get("num_key_value_heads") if config.get("num_key_value_heads") not in (None, heads) else None,
        "vocab_size": config["vocab_size"], "tie_embeddings": bool(config.get("tie_word_embeddings")),
        "rope_theta": float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)), "ffn_hidden": config.get("intermediate_size"),
        "moe": {"num_experts": 0},
    }
    names = {hf: atoll for atoll, hf in {**_COMMON, **(_DENSE_MLP if arch == "llama" else {})}.items()}
    out: dict[str, torch.Tensor] = {}
    plan = _MOE.get(arch)
    experts: dict[tuple[int, int], dict[int, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        layer, pattern = _hf_pattern(name)
        if pattern in names:
            out[names[pattern].format(i=layer)] = tensor.float()
        elif plan and pattern == plan["router"]:
            out[f"layers.{layer}.feed_forward.router.gate.weight"] = tensor.float()
        elif arch == "glm4_moe" and pattern == "model.layers.{i}.mlp.gate.e_score_correction_bias":
            out[f"layers.{layer}.feed_forward.router.expert_bias_E"] = tensor.float()
        elif plan and (found := _expert_of(name, plan)) is not None:
            which, expert = found
            experts.setdefault((layer, which), {})[expert] = tensor.float()
        elif plan and plan["shared"] and pattern.startswith(plan["shared"] + "."):
            proj = pattern.rsplit(".", 2)[1]
            atoll_name = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[proj]
            value = tensor.float() / 2 if arch == "qwen2_moe" and proj == "down_proj" else tensor.float()
            out[f"layers.{layer}.feed_forward.shared_expert.{atoll_name}.weight"] = value
        elif arch == "qwen2_moe" and pattern == "model.layers.{i}.mlp.shared_expert_gate.weight":
            continue  # checked to be zero: a constant gate of 1/2, folded into down_proj
        else:
            raise CheckpointError(f"{name} ({ARCHITECTURES[arch]}) has no place in an atoll model")
    if plan:
        num_experts = config.get("num_local_experts") or config.get("num_experts") or config.get("n_routed_experts")
        for (layer, which), per_expert in experts.items():
            if sorted(per_expert) != list(range(num_experts)):
                raise CheckpointError(f"layer {layer} holds experts {sorted(per_expert)} of {num_experts}")
            stacked = torch.stack([per_expert[e].t() for e in range(num_experts)])  # -> [E, D, H] / [E, H, D]
            out[f"layers.{layer}.feed_forward.experts.{('w1', 'w3', 'w2')[which]}"] = stacked.contiguous()
        for layer in range(layers):  # no selection bias in these architectures: atoll's is zero
            out.setdefault(f"layers.{layer}.feed_forward.router.expert_bias_E", torch.zeros(num_experts))
        hidden = config.get("moe_intermediate_size") or config["intermediate_size"]
        shared = arch == "qwen2_moe" and config.get("shared_expert_intermediate_size") or \
            arch == "glm4_moe" and config.get("n_shared_experts")
        model["moe"] = {"num_experts": num_experts, "top_k": config["num_experts_per_tok"], "hidden": hidden,
                        "score_func": "sigmoid" if arch == "glm4_moe" else "softmax",
                        "renormalize": bool(config.get("norm_topk_prob", True)) if arch != "mixtral" else True,
                        "shared_expert": bool(shared),
                        "balance": "aux_free" if arch == "glm4_moe" else "aux_loss"}
        model["ffn_hidden"] = hidden
        if not shared:  # a shared expert of width 0 adds exactly nothing
            out = {k: v for k, v in out.items() if ".shared_expert." not in k}
    if model["tie_embeddings"]:  # one matrix under both names, as atoll's own checkpoints hold it
        out["output.weight"] = out["tok_embeddings.weight"]
    return model, out


def _hf_pattern(name: str) -> tuple[Optional[int], str]:
    match = re.match(r"model\.layers\.(\d+)\.(.*)", name)
    return (int(match.group(1)), "model.layers.{i}." + match.group(2)) if match else (None, name)


def _expert_of(name: str, plan: dict) -> Optional[tuple[int, int]]:
    for which, pattern in enumerate(plan["experts"]):
        regex = re.escape(pattern).replace(r"\{i\}", r"\d+").replace(r"\{e\}", r"(\d+)")
        match = re.fullmatch(regex, name)
        if match:
            return which, int(match.group(1))
    return None


def _refuse_unrepresentable(config: dict, arch: str, tensors: dict[str, torch.Tensor]) -> None:
    """One line for the first option atoll cannot represent exactly."""
    def zero(suffix: str) -> bool:
        return all(not bool(t.any()) for n, t in tensors.items() if n.endswith(suffix))

    checks: list[tuple[bool, str]] = [
        (config.get("hidden_act", "silu") != "silu", f"hidden_act={config.get('hidden_act')} (atoll uses silu)"),
        (bool(config.get("sliding_window")) and (arch == "mixtral" or config.get("use_sliding_window")),
         f"a sliding attention window ({config.get('sliding_window')} tokens)"),
        (any(n.endswith("_proj.bias") for n in tensors), "attention or MLP biases"),
        ((config.get("rope_parameters") or {}).get("rope_type", "default") != "default" or
         config.get("rope_scaling"), "RoPE scaling"),
        (float((config.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)) != 1.0,
         "partial rotary embeddings"),
    ]
    if arch == "qwen2_moe":
        checks += [(not zero("shared_expert_gate.weight"), "a gated shared expert (shared_expert_gate is not zero)"),
                   (config.get("decoder_sparse_step", 1) != 1 or bool(config.get("mlp_only_layers")),
                    "dense layers between MoE layers"),
                   (config.get("shared_expert_intermediate_size") not in (0, None, config.get("moe_intermediate_size")),
                    "a shared expert wider than the routed experts")]
    if arch == "glm4_moe":
        checks += [(config.get("use_qk_norm", False), "query/key norms (use_qk_norm)"),
                   (config.get("first_k_dense_replace", 0) != 0, "dense layers before the MoE layers"),
                   (float(config.get("routed_scaling_factor", 1.0)) != 1.0, "routed_scaling_factor != 1"),
                   (config.get("n_group", 1) != 1 or config.get("topk_group", 1) != 1, "group-limited routing"),
                   (config.get("n_shared_experts", 0) > 1, "more than one shared expert")]
    for failed, what in checks:
        if failed:
            raise CheckpointError(f"{ARCHITECTURES[arch]} with {what} cannot be represented in atoll")


def hf_model_overrides(model: dict, prefix: str = "model.") -> list[str]:
    """`key=value` recipe overrides that select `model` (to train the imported checkpoint)."""
    items: list[str] = []

    def walk(node: dict, path: str, emit: Callable[[str], None]) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{path}{key}.", emit)
            else:
                emit(f"{path}{key}={'null' if value is None else str(value).lower() if isinstance(value, bool) else value}")

    walk(model, prefix, items.append)
    return items
