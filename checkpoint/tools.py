"""Offline checkpoint tools behind `atoll ckpt ...`: inspect, verify, export, import.

They run in one process with no process group and read tensors by their
global names, so they work on a checkpoint saved under any layout.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch

from atoll.checkpoint.checkpointer import tensor_dir
from atoll.checkpoint.dcp_io import read_tensors, tensor_index, write_tensors
from atoll.checkpoint.hf import (DEFAULT_MAX_SHARD_BYTES, from_hf, hf_model_overrides, read_hf_folder, to_hf,
                                write_hf_folder)
from atoll.checkpoint.hf_tokenizer import write_tokenizer
from atoll.checkpoint.deepspeed_universal import UniversalState, read_universal, write_universal
from atoll.checkpoint.manifest import CheckpointError, read_manifest, verify, write_manifest
from atoll.checkpoint.state import MODEL_PREFIX
from atoll.checkpoint.store import commit, partial_dir, resolve_checkpoint

DILOCO_GLOBAL_PREFIX = "diloco.global."
MOMENT_PREFIX = "optim.state."
PARAM_GROUP_PREFIX = "param_groups."
MOMENTS = ("exp_avg", "exp_avg_sq", "step")
# The optimizer settings that cross over; implementation flags (fused, foreach,
# ...) belong to each framework's own optimizer and are not copied.
HYPER_PARAMETERS = ("lr", "betas", "eps", "weight_decay")
LAYOUT_ORDER = ("islands", "pp", "dp", "ep", "dp_shard")  # as Layout.describe reads


def inspect(path: Path) -> dict[str, Any]:
    """Step, samples, layout, tensors with global shapes and size (no hashing)."""
    ckpt = resolve_checkpoint(path)
    manifest = read_manifest(ckpt)
    return {"path": str(ckpt), "step": manifest["step"], "samples": manifest.get("samples"),
            "layout": manifest.get("layout"), "format_version": manifest["format_version"],
            "bytes": sum(f["size"] for f in manifest["files"].values()),
            "files": len(manifest["files"]), "tensors": manifest["tensors"]}


def describe(path: Path) -> list[str]:
    """`atoll ckpt inspect`'s summary for people, in a few lines. Files are checked by
    size only; `verify` re-hashes them."""
    ckpt = resolve_checkpoint(path)
    manifest = read_manifest(ckpt)
    layout = dict(manifest.get("layout") or {})
    world = layout.pop("world_size", "?")
    ordered = sorted(layout.items(), key=lambda kv: (LAYOUT_ORDER.index(kv[0]) if kv[0] in LAYOUT_ORDER
                                                     else len(LAYOUT_ORDER), kv[0]))
    recipe = manifest.get("recipe") or {}
    name = (recipe.get("run") or {}).get("name") or \
        (f"none (imported from {recipe['imported_from']})" if "imported_from" in recipe else "none")
    tensors = manifest["tensors"]
    model = [t for key, t in tensors.items() if key.startswith(MODEL_PREFIX)]
    files = manifest["files"]
    size = sum(f["size"] for f in files.values())
    created = manifest.get("created")
    saved = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(created)) if created else "unknown"
    return [f"checkpoint  {ckpt}",
            f"step        {manifest['step']} ({manifest.get('samples')} samples consumed)"
            + (", weights only" if manifest.get("weights_only") else ""),
            f"saved       {saved}",
            f"layout      world={world}" + "".join(f" {key}={value}" for key, value in ordered),
            f"recipe      {name}",
            f"tensors     {len(tensors)} ({len(model)} of the model: "
            f"{sum(math.prod(t['shape']) for t in model):,} values)",
            f"size        {_binary_units(size)} ({size:,} bytes) in {len(files)} files",
            f"files       {_size_check(ckpt, files)}"]


def _size_check(ckpt: Path, files: dict[str, dict]) -> str:
    for name, info in sorted(files.items()):
        path = ckpt / name
        if not path.is_file():
            return f"DAMAGED: {name} is missing"
        if path.stat().st_size != info["size"]:
            return f"DAMAGED: {name} has {path.stat().st_size} bytes, the manifest says {info['size']}"
    return "sizes match the manifest; hashes not checked (atoll ckpt verify re-hashes every file)"


def _binary_units(size: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    unit = 0
    while size >= 1024 and unit < len(units) - 1:
        size, unit = size / 1024, unit + 1
    return f"{size:.0f} B" if unit == 0 else f"{size:.1f} {units[unit]}"


def verify_path(path: Path) -> Path:
    ckpt = resolve_checkpoint(path)
    verify(ckpt)
    return ckpt


def load_model_and_moments(ckpt: Path, model_only: bool = False
                           ) -> tuple[dict, dict[str, torch.Tensor], dict[str, dict]]:
    """(manifest, every tensor, per-parameter optimizer hyper-parameters) of a verified checkpoint;
    `model_only` reads only the model's tensors (and the DiLoCo global parameters)."""
    manifest = verify(ckpt)
    keys = [k for k in manifest["tensors"] if k.startswith((MODEL_PREFIX, DILOCO_GLOBAL_PREFIX))] \
        if model_only else None
    tensors = read_tensors(tensor_dir(ckpt, manifest), manifest["tensors"], keys)
    if manifest.get("islands"):  # DiLoCo: the model is the islands' global parameters
        for name in [k for k in tensors if k.startswith(DILOCO_GLOBAL_PREFIX)]:
            tensors[MODEL_PREFIX + name[len(DILOCO_GLOBAL_PREFIX):]] = tensors[name]
    optim_json = manifest["state"].get("model_optim", {}).get("optim", {})
    groups: dict[str, dict] = defaultdict(dict)
    for key, value in optim_json.items():
        if key.startswith(PARAM_GROUP_PREFIX):
            name, _, hyper = key[len(PARAM_GROUP_PREFIX):].rpartition(".")
            groups[name][hyper] = value
    return manifest, tensors, dict(groups)


def model_weights(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, the model's tensors under their names without `model.`) of the checkpoint at
    `path` (a step, checkpoints or run folder), verified, under any layout it was saved with;
    for DiLoCo islands the global parameters."""
    manifest, tensors, _ = load_model_and_moments(resolve_checkpoint(path), model_only=True)
    return manifest, {k[len(MODEL_PREFIX):]: v.contiguous() for k, v in tensors.items()
                      if k.startswith(MODEL_PREFIX)}


def export_hf(path: Path, out: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
              report: Callable[[str], None] = print) -> Path:
    """A transformers model folder (config.json, safetensors, generation_config.json and the
    tokenizer: checkpoint/hf_tokenizer.py) in the architecture that computes what the
    checkpoint's model does (checkpoint/hf.py); `report` gets one line about the tokenizer."""
    manifest, weights = model_weights(path)
    config, hf_tensors = to_hf(weights, manifest["recipe"]["model"])
    write_hf_folder(out, config, hf_tensors, {"atoll_step": str(manifest["step"])}, max_shard_bytes)
    report(write_tokenizer(out, manifest["recipe"].get("data"), config["max_position_embeddings"]))
    return out


def import_hf(src: Path, out: Path) -> tuple[Path, list[str]]:
    """A transformers folder as a committed weights-only atoll checkpoint under `out` (step 0);
    returns it and the `model.*` overrides a recipe needs to train it."""
    config, hf_tensors = read_hf_folder(src)
    model, weights = from_hf(config, hf_tensors)
    tensors = {MODEL_PREFIX + name: value.contiguous() for name, value in weights.items()}
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    target = partial_dir(root, 0)
    write_tensors(target, tensors)
    write_manifest(target, step=0, samples=0, layout={"world_size": 1, "source": "hf"},
                   recipe={"model": model}, tensors=tensor_index(tensors), state={"train": {"step": 0}},
                   extra={"weights_only": True, "imported_from": str(src), "imported_at": time.time(),
                          "architecture": config.get("architectures", [config.get("model_type")])[0]})
    return commit(root, 0), hf_model_overrides(model)


def export_deepspeed(path: Path, out: Path) -> Path:
    """DeepSpeed's universal checkpoint layout (weights, Adam moments, step)."""
    ckpt = resolve_checkpoint(path)
    manifest, tensors, groups = load_model_and_moments(ckpt)
    params = {k[len(MODEL_PREFIX):]: v.float() for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    moments: dict[str, dict[str, torch.Tensor]] = {m: {} for m in MOMENTS}
    for key, value in tensors.items():
        if key.startswith(MOMENT_PREFIX):
            name, _, moment = key[len(MOMENT_PREFIX):].rpartition(".")
            moments[moment][name] = value
    if not moments["exp_avg"]:
        raise CheckpointError(f"checkpoint {ckpt} has no optimizer moments")
    # Buffers (a router's balancing bias) have no moments: they travel in the module's state,
    # as in DeepSpeed's own checkpoints. Its universal loader restores parameters only, so a
    # bias that is not zero would silently be lost there: refuse it.
    buffers = {name: value for name, value in params.items() if name not in moments["exp_avg"]}
    moved = [name for name, value in buffers.items() if name.endswith("expert_bias_E") and bool(value.any())]
    if moved:
        raise CheckpointError(f"model.moe.balance=aux_free: DeepSpeed's universal loader restores parameters "
                              f"only, so the router bias ({moved[0]}, not zero) would be lost; export "
                              "--format hf instead")
    params = {name: value for name, value in params.items() if name in moments["exp_avg"]}
    # Stacked experts [E, ...] are one parameter each, tagged as DeepSpeed tags expert weights.
    tags = {name: {"is_expert_param": True, "ep_num_experts": value.shape[0]}
            for name, value in params.items() if ".experts." in name}
    steps = {int(t.item()) for t in moments["step"].values()}
    state = UniversalState(params=params, exp_avg=moments["exp_avg"], exp_avg_sq=moments["exp_avg_sq"],
                           step=max(steps) if steps else 0, param_groups=_group_params(groups),
                           extra={"model": manifest["recipe"]["model"], "atoll_step": manifest["step"]},
                           tags=tags, buffers=buffers)
    return write_universal(state, out)


def _group_params(per_param: dict[str, dict]) -> list[dict]:
    """Parameters with identical hyper-parameters form one group.

    DeepSpeed matches groups by position; atoll builds its optimizer with the
    weight-decayed group first, so groups are ordered by decreasing decay.
    """
    grouped: dict[str, dict] = {}
    for name, hyper in sorted(per_param.items()):
        kept = {k: hyper[k] for k in HYPER_PARAMETERS if k in hyper}
        key = json.dumps(kept, sort_keys=True)
        grouped.setdefault(key, {**kept, "params": []})["params"].append(name)
    return sorted(grouped.values(), key=lambda g: -g.get("weight_decay", 0.0))


def import_deepspeed(src: Path, out: Path) -> Path:
    """A DeepSpeed universal checkpoint as an atoll checkpoint folder under `out`.

    Weights and Adam moments come over exactly; the training step continues
    from the optimizer's step. DeepSpeed does not record the data position,
    so the data order restarts from its first sample.
    """
    state = read_universal(src)
    tensors: dict[str, torch.Tensor] = {}
    optim_json: dict[str, Any] = {}
    for name, buffer in state.buffers.items():
        tensors[MODEL_PREFIX + name] = buffer.contiguous()
    for name, param in state.params.items():
        tensors[MODEL_PREFIX + name] = param.float().contiguous()
        tensors[f"{MOMENT_PREFIX}{name}.exp_avg"] = state.exp_avg[name].float().contiguous()
        tensors[f"{MOMENT_PREFIX}{name}.exp_avg_sq"] = state.exp_avg_sq[name].float().contiguous()
        tensors[f"{MOMENT_PREFIX}{name}.step"] = torch.tensor(float(state.step))
    for group in state.param_groups:
        hyper = {k: v for k, v in group.items() if k in HYPER_PARAMETERS}
        for name in group.get("params", []):
            for key, value in hyper.items():
                optim_json[f"{PARAM_GROUP_PREFIX}{name}.{key}"] = value
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    target = partial_dir(root, state.step)
    write_tensors(target, tensors)
    json_state = {"model_optim": {"model": {}, "optim": optim_json},
                  "scheduler": {"last_epoch": state.step},
                  "data": {"samples_consumed": 0}, "train": {"step": state.step}}
    write_manifest(target, step=state.step, samples=0, layout={"world_size": 1, "source": "deepspeed"},
                   recipe={"imported_from": str(src), "imported_at": time.time(), **state.extra},
                   tensors=tensor_index(tensors), state=json_state)
    return commit(root, state.step)
