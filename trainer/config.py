"""Recipe schema and loader.

A recipe is a YAML file validated against the dataclasses below, merged with
OmegaConf dotlist overrides (`parallel.dp=2`), the command line winning. Every
problem a user can make in a recipe (unknown key, wrong type, value out of
range, impossible parallel layout) becomes one `RecipeError` whose message
names the key; the CLI turns it into a one-line error and exit code 2.

This module knows nothing about processes, models or files beyond the recipe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf import errors as oc_errors


class RecipeError(ValueError):
    """A recipe problem a user must fix; the message is one line naming the key."""


# --------------------------------------------------------------------------- schema


@dataclass
class RunConfig:
    name: str = "default"
    dir: Optional[str] = None  # default: runs/<name>
    seed: int = 0
    steps: int = 100
    stop_at: int = 0  # end this invocation after this step (resumable later); 0 = run.steps
    overwrite: bool = False


@dataclass
class MoEConfig:
    num_experts: int = 0  # 0 = dense SwiGLU feed-forward in every layer
    top_k: int = 2
    hidden: Optional[int] = None  # expert hidden size; default: model FFN hidden
    kernel: str = "naive"
    capacity_factor: Optional[float] = None  # None = dropless
    balance: str = "aux_loss"  # aux_loss | aux_free | none
    aux_loss_coef: float = 0.01
    bias_update_rate: float = 1e-3  # aux_free: bias step per optimizer step
    groups: int = 0  # group-limited routing: top_k/groups experts from each of `groups` groups
    score_func: str = "softmax"  # softmax | sigmoid
    renormalize: bool = True  # renormalise the top-k gates to sum to one
    renormalize_over: str = "selected"  # selected | nonzero (AdaMoE: not over zero experts)
    shared_expert: bool = False
    # Experts without weights (MoE++), picked by the same top-k; AdaMoE's null experts are
    # zero experts with renormalize_over=nonzero.
    zero_experts: int = 0  # E(x) = 0
    copy_experts: int = 0  # E(x) = x
    constant_experts: int = 0  # E(x) = a1 x + a2 v, [a1, a2] = softmax(W_c x)
    gating_residual: bool = False  # router logits add a projection of the previous layer's
    zero_compute_tau: float = 1.0  # balance weight of zero-computation experts (MoE++'s tau)
    z_loss_coef: float = 0.0  # router z-loss (ST-MoE)


@dataclass
class ModelConfig:
    dim: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: Optional[int] = None  # grouped-query attention: key/value heads; None = heads
    vocab_size: int = 256
    tie_embeddings: bool = False  # the output head reuses the token embedding matrix
    ffn_hidden: Optional[int] = None  # default: SwiGLU-sized 8/3·dim rounded to 16
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32: the compute precision
    activation_checkpointing: str = "none"  # none | full | selective (every ac_every-th block)
    ac_every: int = 2  # selective: recompute every ac_every-th block
    compile: bool = False  # torch.compile each transformer block
    moe: MoEConfig = field(default_factory=MoEConfig)


# Sources whose ids are UTF-8 bytes; `dataset` and `text` use data.tokenizer (dataset: bytes without).
BYTE_SOURCES = ("stdlib", "folder")


@dataclass
class MixtureSourceConfig:
    """One entry of `data.mixture`: a named, weighted source with the keys of one data source."""

    name: str = MISSING  # names its metrics: samples.<name>, eval_loss.<name>
    weight: float = MISSING  # share of the samples (weights are normalised; 0 = evaluated only)
    source: str = "dataset"  # stdlib | folder | tokens | text | dataset
    path: Optional[str] = None
    text_field: Optional[str] = None  # default: data.text_field
    token_dtype: Optional[str] = None  # default: data.token_dtype


@dataclass
class DataConfig:
    source: str = "stdlib"  # stdlib | folder | tokens | text | dataset
    path: Optional[str] = None  # folder of text files, flat token file, or corpus file/folder/glob
    tokenizer: Optional[str] = None  # a local tokenizer folder (tokenizer.json); dataset: bytes without
    token_dtype: str = "uint16"  # for source=tokens
    max_bytes: int = 16_000_000  # cap on text read for stdlib/folder/text sources
    text_field: str = "text"  # source=dataset: the field (jsonl) or column (parquet, arrow) of the text
    tokenize_workers: Optional[int] = None  # processes that tokenise a corpus; default: the cores
    mixture: Optional[list[MixtureSourceConfig]] = None  # replaces source/path: several weighted sources
    seq_len: int = 128
    micro_batch: int = 4
    grad_accum: int = 1
    val_fraction: float = 0.02


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.0  # sgd only
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant, after the warmup
    decay_fraction: float = 0.1  # wsd: the share of run.steps spent decaying to min_lr_ratio


@dataclass
class ParallelConfig:
    dp: int = 1
    ep: int = 1
    pp: int = 1
    dp_shard: str = "auto"  # auto | fsdp | ddp (auto: DDP while replicated state is small against the device)
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b
    microbatches: Optional[int] = None  # pipeline microbatches per data micro-batch; default pp
    pp_virtual_stages: int = 2  # stages per rank with interleaved_1f1b
    pp_first_last_layers: Optional[int] = None  # layers on the first and last stage; default balanced


@dataclass
class LaunchConfig:
    backend: str = "ray"  # ray | local | torchrun (torchrun is detected, not chosen)
    ray_address: Optional[str] = None  # None: start a local cluster; "auto": join
    ray_object_store_mb: str = "auto"  # auto (sized from the state) | MB of a cluster atoll starts
    cpus_per_worker: int = 1
    gpus_per_worker: Optional[int] = None  # None: 1 when the cluster has GPUs, else 0
    device_memory_gb: Optional[float] = None  # memory plan budget; None: the device's own
    threads_per_worker: int = 0  # torch intra-op threads; 0 = cores / local workers


@dataclass
class CheckpointConfig:
    interval: int = 0  # steps between checkpoints; 0 = never
    async_: bool = True  # spelled `async` in recipes
    keep: int = 3
    keep_every: int = 0
    resume: str = "auto"  # auto | none | PATH
    load_optimizer: bool = True  # false: take only the weights of checkpoint.resume (fine-tuning)
    memory_interval: str = "auto"  # steps between in-memory snapshots; 0 = off; auto: cost <= 5% of a step
    memory_replicas: int = 1  # copies of each snapshot on other nodes (Ray)


@dataclass
class FaultToleranceConfig:
    max_restarts: int = 3  # group restarts after crashes before the run fails; 0 = none
    restart_backoff_s: float = 0.0  # wait before the n-th restart: backoff × 2^(n-1), capped at 30 s
    min_workers: int = 0  # smallest world to shrink to when the full one cannot be placed; 0 = no shrinking
    hang_timeout_s: float = 60.0  # no step completed by some rank for this long: a hang
    placement_timeout_s: float = 30.0  # how long to wait for the full world's resources after a failure
    collective_timeout_s: float = 300.0  # process-group timeout of every training collective
    spike_factor: float = 0.0  # a loss above this × the running median is an anomaly; 0 = off
    max_bad_steps: int = 3  # anomalous steps in a row before rolling back to the last good state
    stop_grace_s: float = 20.0  # SIGINT/SIGTERM: longest wait for the step boundary and its checkpoint
    straggler: str = "report"  # off | report | evict (a rank computing slower than its peers)
    straggler_threshold: float = 0.7  # score (fastest rank's compute time / this rank's) below which it straggles
    straggler_window: int = 20  # steps a rank must stay below the threshold before it is named
    straggler_evict_after: int = 10  # evict: steps the straggler may cost the run before its node is left out
    straggler_cooldown_s: float = 600.0  # evict: how long an evicted node is kept out of the run


@dataclass
class DilocoConfig:
    islands: int = 1  # replicas of the whole layout that sync every inner_steps; 1 = plain training
    inner_steps: int = 50  # H: inner optimizer steps between outer steps
    outer_optimizer: str = "sgd"  # sgd (with outer_momentum and nesterov)
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    fragments: int = 1  # F: layer fragments synced on staggered steps
    overlap_steps: int = 0  # tau: inner steps a fragment's reduction overlaps before it applies
    delayed_update: bool = False  # apply each outer update one outer step late (eager local part)
    quantize: str = "none"  # none | bf16 | int8 | int4 pseudo-gradients on the wire
    int4_group: int = 64  # values per int4 scale
    wait_timeout_s: float = 30.0  # how long an outer reduction waits for a lost island (< hang_timeout_s)
    bandwidth_mbit: float = 0.0  # throttle the outer reduction to this link speed; 0 = unthrottled


@dataclass
class LoggingConfig:
    log_interval: int = 10
    eval_interval: int = 50  # 0 = never
    eval_batches: int = 4  # validation set: this many steps' worth of the run's samples (all islands)
    wandb: str = "offline"  # offline | online | disabled
    progress: bool = True  # rank-0 progress bar on a terminal


@dataclass
class Recipe:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fault_tolerance: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)
    diloco: DilocoConfig = field(default_factory=DilocoConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# Which (dataclass, field) pairs are nested sections rather than values.
_SECTION_TYPES = {
    (Recipe, f.name): f.default_factory for f in dataclasses.fields(Recipe)
}
_SECTION_TYPES[(ModelConfig, "moe")] = MoEConfig

# Recipe keys that are Python keywords and so carry a trailing underscore here.
_KEYWORD_FIELDS = {("checkpoint", "async"): "async_"}

# --------------------------------------------------------------------------- loading


def recipes_dir() -> Path:
    """The folder holding the shipped recipes (source tree or installed copy)."""
    spec = importlib.util.find_spec("atoll.recipes")
    for location in (spec.submodule_search_locations or []) if spec else []:
        if Path(location).is_dir():
            return Path(location)
    raise RecipeError("the shipped recipes folder (atoll.recipes) is not installed")


def resolve_recipe_path(recipe: Optional[str]) -> Path:
    """A path as given, else a name in recipes/ (with or without `.yaml`)."""
    if recipe is None:
        return recipes_dir() / "default.yaml"
    path = Path(recipe)
    if path.is_file():
        return path
    for candidate in (recipes_dir() / recipe, recipes_dir() / f"{recipe}.yaml"):
        if candidate.is_file():
            return candidate
    names = ", ".join(sorted(p.stem for p in recipes_dir().glob("*.yaml")))
    raise RecipeError(f"recipe '{recipe}' is neither a file nor a shipped recipe ({names})")


def load_recipe(recipe: Optional[str] = None, overrides: list[str] = ()) -> DictConfig:
    """Load, merge and validate a recipe; raises RecipeError on any problem."""
    path = resolve_recipe_path(recipe)
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml errors carry multi-line context
        raise RecipeError(f"cannot parse recipe {path}: {_one_line(exc)}") from None
    if not isinstance(loaded, DictConfig):
        raise RecipeError(f"recipe {path} must be a mapping of sections")
    try:
        cli = OmegaConf.from_dotlist(list(overrides))
    except Exception as exc:
        raise RecipeError(f"bad override: {_one_line(exc)}") from None
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override '{item}' must look like key=value")
    return build_recipe(loaded, cli)


def recipe_from_dict(data: dict) -> DictConfig:
    """Rebuild a validated recipe from `to_dict` output (used by workers)."""
    return build_recipe(OmegaConf.create(data))


def build_recipe(*layers: DictConfig) -> DictConfig:
    schema = OmegaConf.structured(Recipe)
    try:
        merged = OmegaConf.merge(schema, *(_to_field_names(layer) for layer in layers))
    except oc_errors.ConfigKeyError as exc:
        raise RecipeError(f"unknown recipe key '{_mixture_key(layers, _user_key(exc.full_key))}'") from None
    except oc_errors.ValidationError as exc:
        raise RecipeError(_validation_message(exc)) from None
    except oc_errors.OmegaConfBaseException as exc:
        raise RecipeError(f"invalid recipe: {_one_line(exc)}") from None
    from atoll.trainer.recipe_checks import validate  # it reads this module's schema

    validate(merged)
    return merged


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    """Plain dict with the recipe's own spelling of keys (for YAML and workers)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for (section, key), field_name in _KEYWORD_FIELDS.items():
        data[section][key] = data[section].pop(field_name)
    return data


def recipe_sha256(cfg: DictConfig) -> str:
    """A fingerprint of the resolved recipe (events name the recipe a run started with)."""
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def _to_field_names(layer: DictConfig) -> DictConfig:
    data = OmegaConf.to_container(layer, resolve=False)
    for (section, key), field_name in _KEYWORD_FIELDS.items():
        if isinstance(data.get(section), dict) and key in data[section]:
            data[section][field_name] = data[section].pop(key)
    _check_sections(data, Recipe)
    return OmegaConf.create(data)


def _user_key(full_key: Any) -> str:
    key = str(full_key)
    for (section, name), field_name in _KEYWORD_FIELDS.items():
        key = key.replace(f"{section}.{field_name}", f"{section}.{name}")
    return key


def _mixture_key(layers: tuple[DictConfig, ...], key: str) -> str:
    """An unknown key inside a `data.mixture` entry, which OmegaConf names without its path."""
    if "." in key:
        return key
    for layer in layers:
        entries = OmegaConf.to_container(layer, resolve=False).get("data", {}) or {}
        for i, entry in enumerate(entries.get("mixture") or [] if isinstance(entries, dict) else []):
            if isinstance(entry, dict) and key in entry:
                return f"data.mixture[{i}].{key}"
    return key


def _validation_message(exc: oc_errors.ValidationError) -> str:
    key = _user_key(exc.full_key)
    value = getattr(exc, "value", None)
    msg = exc.msg.splitlines()[0] if exc.msg else str(exc)
    if "could not be converted to" in msg:
        target = msg.split("could not be converted to", 1)[1].strip().rstrip(".")
        return f"recipe key '{key}' must be {_type_word(target)}, got '{value}'"
    if "is not a valid bool" in msg:
        return f"recipe key '{key}' must be true or false, got '{value}'"
    if "'None'" in msg or "cannot be None" in msg or "Non optional" in msg:
        return f"recipe key '{key}' must not be null"
    if "Cannot convert" in msg:
        return f"recipe key '{key}' must be a single value, not a list or section"
    return f"recipe key '{key}': {msg}"


def _check_sections(data: dict, cls: type, prefix: str = "") -> None:
    """Sections must stay sections: `model=3` would otherwise give a vague error."""
    for name, value in data.items():
        sub = _SECTION_TYPES.get((cls, name))
        if sub is None:
            continue
        if not isinstance(value, dict):
            raise RecipeError(f"recipe key '{prefix}{name}' must be a section of keys, got '{value}'")
        _check_sections(value, sub, f"{prefix}{name}.")


def _type_word(omegaconf_type: str) -> str:
    return {"Integer": "an integer", "Float": "a number", "Boolean": "true or false",
            "String": "a string"}.get(omegaconf_type, omegaconf_type)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


# --------------------------------------------------------------------------- validation


def memory_interval(cfg: DictConfig) -> Optional[int]:
    """`checkpoint.memory_interval` as steps: 0 = off, None = auto (chosen from measured cost)."""
    value = cfg.checkpoint.memory_interval
    return None if value == "auto" else int(value)


def memory_tier_on(cfg: DictConfig) -> bool:
    return memory_interval(cfg) != 0


def object_store_mb(cfg: DictConfig) -> Optional[int]:
    """`launch.ray_object_store_mb` in MB; None = auto (sized from the state)."""
    value = cfg.launch.ray_object_store_mb
    return None if value == "auto" else int(value)


def world_size(cfg: DictConfig) -> int:
    """Processes the recipe's layout needs: islands × pp × dp."""
    return cfg.diloco.islands * cfg.parallel.pp * cfg.parallel.dp


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.run.dir) if cfg.run.dir else Path("runs") / cfg.run.name


def ffn_hidden(model: ModelConfig | DictConfig) -> int:
    """Hidden size of the dense SwiGLU: 8/3·dim rounded up to a multiple of 16."""
    if model.ffn_hidden:
        return int(model.ffn_hidden)
    return 16 * ((8 * model.dim // 3 + 15) // 16)


# What a set of weights means: the keys a run taking another run's weights must share with it.
_MODEL_FUNCTION_KEYS = ("dim", "layers", "heads", "kv_heads", "vocab_size", "tie_embeddings", "rope_theta",
                        "norm_eps")
_MOE_FUNCTION_KEYS = ("num_experts", "top_k", "score_func", "renormalize", "renormalize_over", "shared_expert",
                      "groups",
                      "zero_experts", "copy_experts", "constant_experts", "gating_residual")


def model_differences(saved: dict, cfg: DictConfig) -> list[str]:
    """`model.key=value` (the saved value) for every key where the recipe's model computes
    something else than the model the weights were saved from; [] when they agree."""
    current = OmegaConf.to_container(cfg.model, resolve=True)
    base = asdict(ModelConfig())
    saved = {**base, **saved, "moe": {**base["moe"], **(saved.get("moe") or {})}}
    wanted = {f"model.{k}": saved[k] for k in _MODEL_FUNCTION_KEYS}
    have = {f"model.{k}": current[k] for k in _MODEL_FUNCTION_KEYS}
    wanted["model.ffn_hidden"], have["model.ffn_hidden"] = \
        ffn_hidden(OmegaConf.create(saved)), ffn_hidden(cfg.model)
    if saved["moe"]["num_experts"] or current["moe"]["num_experts"]:
        for key in _MOE_FUNCTION_KEYS:
            wanted[f"model.moe.{key}"], have[f"model.moe.{key}"] = saved["moe"][key], current["moe"][key]
        wanted["model.moe.hidden"] = saved["moe"]["hidden"] or wanted["model.ffn_hidden"]
        have["model.moe.hidden"] = current["moe"]["hidden"] or have["model.ffn_hidden"]
    if wanted["model.kv_heads"] in (None, wanted["model.heads"]) and have["model.kv_heads"] in (None, have["model.heads"]):
        wanted["model.kv_heads"] = have["model.kv_heads"]
    return [f"{key}={'null' if value is None else str(value).lower() if isinstance(value, bool) else value}"
            for key, value in wanted.items() if value != have[key]]


def model_config(cfg: DictConfig) -> ModelConfig:
    """The model section as a plain dataclass (model code never sees OmegaConf)."""
    data = OmegaConf.to_container(cfg.model, resolve=True)
    data["moe"] = MoEConfig(**data["moe"])
    return ModelConfig(**data)


def as_dataclass(section: DictConfig, cls: type) -> Any:
    return cls(**OmegaConf.to_container(section, resolve=True))

