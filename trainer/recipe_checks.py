"""Recipe checks that types alone cannot express: ranges, choices and layouts.

`validate` runs on every merged recipe (atoll.trainer.config.build_recipe) and
raises one `RecipeError` naming the key for the first problem it finds.
Like the schema, it knows nothing about processes, models or files.
"""

from __future__ import annotations

import math
import re
from typing import Any

from omegaconf import DictConfig

from atoll.trainer.config import _KEYWORD_FIELDS, BYTE_SOURCES, RecipeError, world_size

CHOICES = {
    "model.dtype": ("auto", "bf16", "fp32"),
    "model.activation_checkpointing": ("none", "full", "selective"),
    "model.moe.kernel": ("auto", "naive", "sorted", "grouped_mm", "triton"),
    "model.moe.balance": ("aux_loss", "aux_free", "none"),
    "model.moe.score_func": ("softmax", "sigmoid"),
    "model.moe.renormalize_over": ("selected", "nonzero"),
    "optim.schedule": ("cosine", "wsd", "constant"),
    "optim.name": ("adamw", "sgd"),
    "diloco.outer_optimizer": ("sgd",),
    "diloco.quantize": ("none", "bf16", "int8", "int4"),
    "data.source": ("stdlib", "folder", "tokens", "text", "dataset"),
    "data.token_dtype": ("uint16", "uint32"),
    "parallel.dp_shard": ("auto", "fsdp", "ddp"),
    "fault_tolerance.straggler": ("off", "report", "evict"),
    "parallel.pp_schedule": ("1f1b", "gpipe", "interleaved_1f1b"),
    "launch.backend": ("ray", "local", "torchrun"),
    "logging.wandb": ("offline", "online", "disabled"),
}

POSITIVE_INTS = (
    "run.steps", "model.dim", "model.layers", "model.heads", "model.vocab_size",
    "model.moe.top_k", "data.seq_len", "data.micro_batch", "data.grad_accum",
    "data.max_bytes", "parallel.dp", "parallel.ep", "parallel.pp",
    "model.ac_every", "launch.cpus_per_worker", "logging.log_interval",
    "logging.eval_batches", "diloco.islands", "diloco.inner_steps", "diloco.fragments",
    "diloco.int4_group", "fault_tolerance.straggler_window", "fault_tolerance.straggler_evict_after",
)
NON_NEGATIVE = (
    "model.moe.num_experts", "model.moe.aux_loss_coef", "model.moe.bias_update_rate",
    "model.moe.groups", "model.moe.zero_experts", "model.moe.copy_experts",
    "model.moe.constant_experts", "model.moe.z_loss_coef", "optim.warmup_steps",
    "optim.weight_decay", "optim.grad_clip", "checkpoint.interval", "run.stop_at",
    "checkpoint.keep", "checkpoint.keep_every", "logging.eval_interval",
    "launch.threads_per_worker", "checkpoint.memory_replicas",
    "fault_tolerance.max_restarts", "fault_tolerance.restart_backoff_s",
    "fault_tolerance.min_workers", "fault_tolerance.spike_factor", "optim.momentum",
    "diloco.outer_momentum", "diloco.overlap_steps", "diloco.bandwidth_mbit",
    "fault_tolerance.straggler_cooldown_s",
)
POSITIVE = ("fault_tolerance.stop_grace_s", "fault_tolerance.hang_timeout_s",
            "fault_tolerance.placement_timeout_s", "fault_tolerance.collective_timeout_s",
            "fault_tolerance.max_bad_steps",
            "diloco.outer_lr", "diloco.wait_timeout_s", "model.moe.zero_compute_tau")


def _get(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[_KEYWORD_FIELDS.get((key.split(".")[0], part), part)]
    return node


def validate(cfg: DictConfig) -> None:
    """Range, choice and layout checks that types alone cannot express."""
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise RecipeError(f"recipe key '{key}' must be one of {', '.join(allowed)}, got '{value}'")
    for key in POSITIVE_INTS:
        if _get(cfg, key) < 1:
            raise RecipeError(f"recipe key '{key}' must be at least 1, got {_get(cfg, key)}")
    for key in NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise RecipeError(f"recipe key '{key}' must not be negative, got {_get(cfg, key)}")
    for key in ("optim.lr",) + POSITIVE:
        if not _get(cfg, key) > 0:
            raise RecipeError(f"recipe key '{key}' must be positive, got {_get(cfg, key)}")
    for key, minimum in (("checkpoint.memory_interval", 0), ("launch.ray_object_store_mb", 1)):
        value = _get(cfg, key)
        if value != "auto" and not (value.isdigit() and int(value) >= minimum):
            raise RecipeError(f"recipe key '{key}' must be auto or an integer of at least {minimum}, "
                              f"got '{value}'")
    if cfg.launch.gpus_per_worker is not None and cfg.launch.gpus_per_worker < 0:
        raise RecipeError(f"recipe key 'launch.gpus_per_worker' must not be negative, "
                          f"got {cfg.launch.gpus_per_worker}")
    if cfg.launch.device_memory_gb is not None and not cfg.launch.device_memory_gb > 0:
        raise RecipeError(f"recipe key 'launch.device_memory_gb' must be positive, "
                          f"got {cfg.launch.device_memory_gb}")
    if not 0 < cfg.fault_tolerance.straggler_threshold < 1:
        raise RecipeError("recipe key 'fault_tolerance.straggler_threshold' must be between 0 and 1 "
                          f"(exclusive), got {cfg.fault_tolerance.straggler_threshold}")
    if not 0 <= cfg.optim.min_lr_ratio <= 1:
        raise RecipeError("recipe key 'optim.min_lr_ratio' must be between 0 and 1")
    if not 0 <= cfg.optim.decay_fraction <= 1:
        raise RecipeError("recipe key 'optim.decay_fraction' must be between 0 and 1")
    if not 0 < cfg.data.val_fraction < 0.5:
        raise RecipeError("recipe key 'data.val_fraction' must be between 0 and 0.5")

    model, moe = cfg.model, cfg.model.moe
    if model.dim % model.heads:
        raise RecipeError(f"model.dim={model.dim} must be divisible by model.heads={model.heads}")
    if (model.dim // model.heads) % 2:
        raise RecipeError(f"model.dim/model.heads={model.dim // model.heads} must be even for rotary embeddings")
    if model.kv_heads is not None and (model.kv_heads < 1 or model.heads % model.kv_heads):
        raise RecipeError(f"model.kv_heads={model.kv_heads} must divide model.heads={model.heads}")
    if model.tie_embeddings and cfg.parallel.pp > 1:
        raise RecipeError("model.tie_embeddings=true needs parallel.pp=1 (the embedding and the output "
                          "head live on different pipeline stages)")
    _check_data(cfg.data, model.vocab_size)
    zero_compute = moe.zero_experts + moe.copy_experts + moe.constant_experts
    if zero_compute and not moe.num_experts:
        raise RecipeError("zero-computation experts (model.moe.zero_experts, copy_experts, constant_experts) "
                          "need an MoE model (model.moe.num_experts > 0)")
    if moe.num_experts and moe.top_k > moe.num_experts + zero_compute:
        if not zero_compute:
            raise RecipeError(f"model.moe.top_k={moe.top_k} must not exceed model.moe.num_experts={moe.num_experts}")
        raise RecipeError(f"model.moe.top_k={moe.top_k} must not exceed the {moe.num_experts + zero_compute} "
                          "experts of model.moe.num_experts, zero_experts, copy_experts and constant_experts")
    if zero_compute and moe.groups > 1:
        raise RecipeError(f"model.moe.groups={moe.groups} cannot be combined with zero-computation experts "
                          "(groups split the experts over ranks; zero-computation experts live on every rank)")
    if moe.renormalize_over == "nonzero" and not moe.renormalize:
        raise RecipeError("model.moe.renormalize_over=nonzero needs model.moe.renormalize=true")
    if moe.gating_residual and not moe.num_experts:
        raise RecipeError("model.moe.gating_residual=true needs an MoE model (model.moe.num_experts > 0)")
    if moe.gating_residual and cfg.parallel.pp > 1:
        raise RecipeError("model.moe.gating_residual=true needs parallel.pp=1 (the router logits it "
                          "carries from layer to layer would have to cross pipeline stages)")
    if moe.capacity_factor is not None and moe.capacity_factor <= 0:
        raise RecipeError(f"model.moe.capacity_factor={moe.capacity_factor} must be positive (null = dropless)")
    if moe.num_experts and moe.groups > 1 and (moe.num_experts % moe.groups or moe.top_k % moe.groups):
        raise RecipeError(f"model.moe.groups={moe.groups} must divide model.moe.num_experts={moe.num_experts} "
                          f"and model.moe.top_k={moe.top_k}")

    par = cfg.parallel
    if par.dp % par.ep:
        raise RecipeError(f"parallel.ep={par.ep} must divide parallel.dp={par.dp}")
    if par.ep > 1 and not moe.num_experts:
        raise RecipeError("parallel.ep > 1 needs an MoE model (model.moe.num_experts > 0)")
    if par.ep > 1 and moe.num_experts % par.ep:
        raise RecipeError(f"parallel.ep={par.ep} must divide model.moe.num_experts={moe.num_experts}")
    if par.pp > 1:
        _validate_pipeline(cfg)
    if cfg.diloco.islands > 1:
        _validate_diloco(cfg)
    ft = cfg.fault_tolerance
    if ft.spike_factor and ft.spike_factor <= 1:
        raise RecipeError(f"fault_tolerance.spike_factor={ft.spike_factor} must be above 1 (0 = off)")
    if ft.min_workers > world_size(cfg):
        raise RecipeError(f"fault_tolerance.min_workers={ft.min_workers} exceeds the layout's "
                          f"{world_size(cfg)} workers")
    if cfg.launch.backend == "local" and world_size(cfg) != 1:
        islands = f", diloco.islands={cfg.diloco.islands}" if cfg.diloco.islands > 1 else ""
        raise RecipeError(f"launch.backend=local runs one process, but the layout needs {world_size(cfg)} (parallel.dp={par.dp}, parallel.pp={par.pp}{islands})")


def _validate_diloco(cfg: DictConfig) -> None:
    """Constraints that only matter with several islands."""
    lo = cfg.diloco
    if lo.fragments > cfg.model.layers:
        raise RecipeError(f"diloco.fragments={lo.fragments} exceeds model.layers={cfg.model.layers} "
                          "(each fragment holds at least one layer)")
    if lo.inner_steps % lo.fragments:
        raise RecipeError(f"diloco.fragments={lo.fragments} must divide diloco.inner_steps={lo.inner_steps} "
                          "(fragments sync on evenly staggered steps)")
    if lo.overlap_steps >= lo.inner_steps:
        raise RecipeError(f"diloco.overlap_steps={lo.overlap_steps} must be below diloco.inner_steps={lo.inner_steps}")
    if lo.delayed_update and lo.overlap_steps:
        raise RecipeError("diloco.overlap_steps must be 0 with diloco.delayed_update=true "
                          "(a delayed update always overlaps a whole outer step)")
    if cfg.fault_tolerance.hang_timeout_s <= lo.wait_timeout_s:
        raise RecipeError(f"fault_tolerance.hang_timeout_s={cfg.fault_tolerance.hang_timeout_s:g} must exceed "
                          f"diloco.wait_timeout_s={lo.wait_timeout_s:g} (islands wait that long for a lost one)")
    if cfg.checkpoint.interval % lo.inner_steps:
        raise RecipeError(f"checkpoint.interval={cfg.checkpoint.interval} must be a multiple of "
                          f"diloco.inner_steps={lo.inner_steps} (checkpoints are taken at outer steps)")
    if cfg.run.stop_at % lo.inner_steps or cfg.run.steps % lo.inner_steps:
        raise RecipeError(f"run.steps={cfg.run.steps} and run.stop_at={cfg.run.stop_at} must be multiples of "
                          f"diloco.inner_steps={lo.inner_steps} (a run ends at an outer step)")


def _validate_pipeline(cfg: DictConfig) -> None:
    par, layers = cfg.parallel, cfg.model.layers
    virtual = par.pp_virtual_stages if par.pp_schedule == "interleaved_1f1b" else 1
    microbatches = par.microbatches or par.pp
    if virtual < 1:
        raise RecipeError(f"parallel.pp_virtual_stages={virtual} must be at least 1")
    if par.pp * virtual > layers:
        raise RecipeError(f"parallel.pp={par.pp} × {virtual} stages per rank exceeds model.layers={layers}")
    if microbatches < par.pp:
        raise RecipeError(f"parallel.microbatches={microbatches} must be at least parallel.pp={par.pp}")
    if cfg.data.micro_batch % microbatches:
        raise RecipeError(f"data.micro_batch={cfg.data.micro_batch} must be divisible by "
                          f"parallel.microbatches={microbatches} (each is split into pipeline microbatches)")
    if par.pp_schedule == "interleaved_1f1b" and microbatches % par.pp:
        raise RecipeError(f"parallel.microbatches={microbatches} must be a multiple of parallel.pp={par.pp} "
                          "for interleaved_1f1b")
    first_last = par.pp_first_last_layers
    stages = par.pp * virtual
    if first_last is not None and (stages < 3 or first_last < 1 or
                                   layers - 2 * first_last < stages - 2):
        raise RecipeError(f"parallel.pp_first_last_layers={first_last} needs at least 3 stages and must "
                          f"leave a layer for each middle stage (model.layers={layers}, {stages} stages)")


SOURCES = CHOICES["data.source"]


def _check_data(data: DictConfig, vocab_size: int) -> None:
    if data.tokenize_workers is not None and data.tokenize_workers < 1:
        raise RecipeError(f"recipe key 'data.tokenize_workers' must be at least 1, got {data.tokenize_workers}")
    if not data.text_field:
        raise RecipeError("recipe key 'data.text_field' must name a field")
    if not data.mixture:
        _check_source(data, "data", data.source, data.path, data.tokenizer, vocab_size)
        return
    if data.path:
        raise RecipeError("data.path cannot be combined with data.mixture (each mixture entry names its own path)")
    names = set()
    for i, entry in enumerate(data.mixture):
        where = f"data.mixture[{i}]"
        if not re.fullmatch(r"[A-Za-z0-9_-]+", entry.name or ""):
            raise RecipeError(f"recipe key '{where}.name' must be letters, digits, '_' or '-' "
                              f"(it names metrics), got '{entry.name}'")
        if entry.name in names:
            raise RecipeError(f"recipe key '{where}.name': '{entry.name}' names two mixture entries")
        names.add(entry.name)
        if entry.source not in SOURCES:
            raise RecipeError(f"recipe key '{where}.source' must be one of {', '.join(SOURCES)}, "
                              f"got '{entry.source}'")
        if entry.token_dtype is not None and entry.token_dtype not in CHOICES["data.token_dtype"]:
            raise RecipeError(f"recipe key '{where}.token_dtype' must be uint16 or uint32, got '{entry.token_dtype}'")
        if not (math.isfinite(entry.weight) and entry.weight >= 0):
            raise RecipeError(f"recipe key '{where}.weight' must be a number of at least 0, got {entry.weight}")
        if data.tokenizer and entry.source in BYTE_SOURCES:
            raise RecipeError(f"recipe key '{where}.source={entry.source}' reads bytes, but data.tokenizer makes the "
                              "other sources' ids tokenizer ids: a mixture speaks one vocabulary")
        _check_source(data, where, entry.source, entry.path, data.tokenizer, vocab_size)
    total = sum(entry.weight for entry in data.mixture)
    if not total > 0:
        raise RecipeError(f"the weights of data.mixture must sum to a positive number, got {total}")


def _check_source(data: DictConfig, where: str, source: str, path, tokenizer, vocab_size: int) -> None:
    byte_level = source in BYTE_SOURCES or (source == "dataset" and not tokenizer)
    if byte_level and vocab_size < 256:
        raise RecipeError(f"model.vocab_size={vocab_size} must be at least 256 for byte-level "
                          f"{where}.source={source}" + (" without data.tokenizer" if source == "dataset" else ""))
    if source in ("folder", "tokens", "text", "dataset") and not path:
        raise RecipeError(f"{where}.path is required when {where}.source={source}")
    if source == "text" and not tokenizer:
        raise RecipeError(f"data.tokenizer (a local tokenizer folder) is required when {where}.source=text")
