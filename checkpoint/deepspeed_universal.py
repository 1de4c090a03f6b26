"""Bridge between plain full tensors and DeepSpeed's universal checkpoint format.

`write_universal` lays out full (unsharded) fp32 weights, AdamW moments and
the optimizer step the way DeepSpeed's `load_universal` path reads them, so a
ZeRO stage 1/2 engine of any data-parallel size whose module has the same
parameter names restores weights, moments and step with
`{"checkpoint": {"load_universal": true}}` and `engine.load_checkpoint(dir)`.
`read_universal` reads such a folder back, whether `write_universal` or
DeepSpeed's own `python -m deepspeed.checkpoint.ds_to_universal` made it.

What DeepSpeed 0.19's loader reads (and so all this writes):
  <root>/latest_universal              the tag (`latest` is never read for universal loads)
  <root>/<tag>/mp_rank_00_model_states.pt
      dp_world_size, mp_world_size, global_steps, skipped_steps (read by the
      engine); module (weights and buffers, loaded strictly into the engine's
      module, so every persistent buffer must be there) and buffer_names;
      param_shapes, ds_config, ds_version and universal_checkpoint_info (read
      by DeepSpeed's tools, not the loader)
  <root>/<tag>/zero/optimizer_state.pt  ds_version (must parse, >= 0.3.17) and
      param_groups (every key but `params` is copied onto the engine's group
      of the same index); absent loss_scaler/clip_grad keep the engine's own
  <root>/<tag>/zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt  {"param": full tensor,
      "cat_dim": 0, ...tags}; <name>/step.pt is the bare step (a float32
      scalar tensor, what torch AdamW keeps). DeepSpeed loads *every* .pt file
      in that folder as an optimizer state, so nothing else may live there.

This file only sees tensors and dicts: it must not import atoll's model or
trainer, and imports DeepSpeed only to re-emit a `sub_param_shape` tag.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

LATEST = "latest_universal"
MODEL_FILE = "mp_rank_00_model_states.pt"
EXTRA_KEY = "atoll_extra"  # engine.load_checkpoint hands this back in client_state
# The DeepSpeed release whose loader this layout follows; stage 1 only checks >= 0.3.17.
DS_VERSION = "0.19.8"
DEFAULT_UC_INFO = {"universal_checkpoint_version": 0.2}


@dataclass
class UniversalState:
    params: dict[str, torch.Tensor]  # full fp32 tensors by parameter name
    exp_avg: dict[str, torch.Tensor]  # empty (with exp_avg_sq) for weights-only
    exp_avg_sq: dict[str, torch.Tensor]
    step: int  # optimizer step count
    param_groups: list[dict]  # hyper-parameters + "params": [names], in group order
    extra: dict = field(default_factory=dict)  # free-form JSON-able info
    # Non-default DeepSpeed per-parameter tags (cat_dim != 0, vocab_tensor,
    # is_expert_param, ep_num_experts, sub_param_shape as a dict, ...).
    tags: dict[str, dict] = field(default_factory=dict)
    # Module buffers that are state (a router's balancing bias): no optimizer
    # state, so they live in the model states' `module` next to the weights.
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)


# --- safe loading ----------------------------------------------------------
# DeepSpeed pickles a few of its own objects next to the tensors. Each is
# mapped to an inert local stand-in (no methods run; BUILD only fills
# __dict__), so torch.load(weights_only=True) never imports or runs
# DeepSpeed code. Nothing else beyond torch's own weights_only set is allowed.
class _Inert:
    """Stand-in for LossScaler objects in optimizer_state.pt (their values are unused)."""


class _SubparamShape:
    """Stand-in for deepspeed.checkpoint.universal_checkpoint.SubparamShape (a dataclass)."""


_SAFE_GLOBALS = [
    (int, "deepspeed.runtime.zero.config.ZeroStageEnum"),  # an IntEnum, rebuilt as its int
    (_Inert, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_Inert, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    (_SubparamShape, "deepspeed.checkpoint.universal_checkpoint.SubparamShape"),
]


def _load(path: Path):
    if not path.is_file():
        raise ValueError(f"missing universal checkpoint file: {path}")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for a disallowed global, RuntimeError/EOFError if damaged
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{path} cannot be loaded with torch.load(weights_only=True): {first}") from exc


def _plain_tags(ckpt: dict) -> dict:
    tags = {}
    for key, value in ckpt.items():
        if key == "param" or (key == "cat_dim" and value == 0):
            continue
        if isinstance(value, _SubparamShape):
            value = {k: getattr(value, k, None) for k in ("patterns", "shape", "partition_dim")}
        tags[key] = value
    return tags


def _ds_tags(tags: dict) -> dict:
    out = dict(tags)
    if isinstance(out.get("sub_param_shape"), dict):
        # DeepSpeed's loader reads this tag by attribute, so it needs the real class.
        try:
            from deepspeed.checkpoint.universal_checkpoint import SubparamShape
        except ImportError as exc:
            raise ValueError(f"writing a sub_param_shape tag needs deepspeed installed: {exc}") from None
        out["sub_param_shape"] = SubparamShape(**out["sub_param_shape"])
    return out


def _step_value(value, path: Path) -> int:
    if isinstance(value, dict):
        value = value.get("param")
    if torch.is_tensor(value) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (int, float)) and float(value) == int(value):
        return int(value)
    raise ValueError(f"{path} does not hold an integral optimizer step: {value!r}")


def _cpu_fp32(t: torch.Tensor) -> torch.Tensor:
    # copy=True so a view into a big flat buffer does not save the whole buffer
    return t.detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous()


# --- write -----------------------------------------------------------------
def _validate(state: UniversalState) -> list[list[str]]:
    if not state.param_groups:
        raise ValueError("UniversalState.param_groups is empty: every parameter needs a group")
    groups = [list(g.get("params", [])) for g in state.param_groups]
    names = [n for g in groups for n in g]
    if len(names) != len(set(names)) or set(names) != set(state.params):
        missing = sorted(set(state.params) - set(names))
        unknown = sorted(set(names) - set(state.params))
        raise ValueError("param_groups must name every parameter exactly once "
                         f"(ungrouped: {missing[:3]}, unknown: {unknown[:3]})")
    has_moments = bool(state.exp_avg or state.exp_avg_sq)
    for name, param in state.params.items():
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"parameter name {name!r} cannot be a folder name")
        for moments, label in ((state.exp_avg, "exp_avg"), (state.exp_avg_sq, "exp_avg_sq")):
            if has_moments and (name not in moments or moments[name].shape != param.shape):
                raise ValueError(f"{label} of {name} is missing or not shaped {tuple(param.shape)}")
    return groups


def write_universal(state: UniversalState, out_dir: Path, tag: str = "global_step{step}") -> Path:
    """Write `state` as `<out_dir>/<tag>` and point `<out_dir>/latest_universal` at it."""
    groups = _validate(state)
    out_dir = Path(out_dir)
    tag = tag.format(step=state.step)
    final = out_dir / tag
    if final.exists():
        raise ValueError(f"{final} already exists")
    tmp = out_dir / f"{tag}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    zero = tmp / "zero"
    zero.mkdir(parents=True)

    has_moments = bool(state.exp_avg)
    step = torch.tensor(float(state.step))  # torch AdamW keeps a float32 scalar
    for name, param in state.params.items():
        folder = zero / name
        folder.mkdir()
        tags = {"cat_dim": 0, **_ds_tags(state.tags.get(name, {}))}
        sources = {"fp32": param}
        if has_moments:
            sources.update(exp_avg=state.exp_avg[name], exp_avg_sq=state.exp_avg_sq[name])
            torch.save(step, folder / "step.pt")
        for key, tensor in sources.items():
            torch.save({**tags, "param": _cpu_fp32(tensor)}, folder / f"{key}.pt")

    hyper = [{k: v for k, v in g.items() if k != "params"} for g in state.param_groups]
    torch.save({"ds_version": DS_VERSION,
                "param_groups": [{**h, "params": [i]} for i, h in enumerate(hyper)]},
               zero / "optimizer_state.pt")

    uc_info = {**DEFAULT_UC_INFO, **state.extra.get("universal_checkpoint_info", {})}
    torch.save({
        "module": {**{n: _cpu_fp32(p) for n, p in state.params.items()},
                   **{n: b.detach().cpu().clone() for n, b in state.buffers.items()}},
        "buffer_names": list(state.buffers),
        "optimizer": None,
        "param_shapes": [{n: torch.Size(state.params[n].shape) for n in g} for g in groups],
        "frozen_param_shapes": None,
        "shared_params": {},
        "frozen_param_fragments": None,
        "lr_scheduler": None,
        "data_sampler": None,
        "random_ltd": None,
        "skipped_steps": 0,
        "global_steps": int(state.extra.get("global_steps", state.step)),
        "dp_world_size": 1,
        "mp_world_size": 1,
        "ds_config": state.extra.get("ds_config", {}),
        "ds_version": DS_VERSION,
        "universal_checkpoint_info": uc_info,
        EXTRA_KEY: state.extra,
    }, tmp / MODEL_FILE)

    os.replace(tmp, final)
    latest_tmp = out_dir / f"{LATEST}.tmp"
    latest_tmp.write_text(tag)
    os.replace(latest_tmp, out_dir / LATEST)
    return final


# --- read ------------------------------------------------------------------
def _tag_folder(src: Path) -> Path:
    if (src / LATEST).is_file():
        return src / (src / LATEST).read_text().strip()
    if (src / "zero").is_dir():
        return src  # already the tag folder
    raise ValueError(f"missing {src / LATEST} (and {src} is not a universal checkpoint tag folder)")


def read_universal(src_dir: Path) -> UniversalState:
    """Read a universal checkpoint (its root holding `latest_universal`, or the tag folder)."""
    folder = _tag_folder(Path(src_dir))
    model = _load(folder / MODEL_FILE)
    optim = _load(folder / "zero" / "optimizer_state.pt")
    shapes = model.get("param_shapes")
    if not isinstance(shapes, list) or len(shapes) != len(optim.get("param_groups", [])):
        raise ValueError(f"{folder / MODEL_FILE}: param_shapes does not match the optimizer's param_groups")

    names = [name for group_shapes in shapes for name in group_shapes]
    # Moments are all-or-none: the first parameter decides, the rest must agree.
    has_moments = bool(names) and (folder / "zero" / names[0] / "exp_avg.pt").exists()
    params, exp_avg, exp_avg_sq, tags, steps = {}, {}, {}, {}, set()
    for name in names:
        base = folder / "zero" / name
        # param_shapes holds the engine's (vocab-padded, TP-sliced) shapes; the files are the truth.
        fp32 = _load(base / "fp32.pt")
        params[name] = fp32["param"]
        if _plain_tags(fp32):
            tags[name] = _plain_tags(fp32)
        if has_moments:
            exp_avg[name] = _load(base / "exp_avg.pt")["param"]
            exp_avg_sq[name] = _load(base / "exp_avg_sq.pt")["param"]
            if (base / "step.pt").exists():
                steps.add(_step_value(_load(base / "step.pt"), base / "step.pt"))
    if len(steps) > 1:
        raise ValueError(f"{folder / 'zero'}: parameters disagree on the optimizer step {sorted(steps)}")

    param_groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(s)}
                    for g, s in zip(optim["param_groups"], shapes)]
    if EXTRA_KEY in model:
        extra = model[EXTRA_KEY]
    else:  # made by DeepSpeed: keep what describes the run
        extra = {k: model[k] for k in ("universal_checkpoint_info", "global_steps", "ds_config",
                                       "ds_version") if model.get(k) is not None}
    module = model.get("module") or {}
    buffers = {name: module[name] for name in model.get("buffer_names") or [] if name in module}
    return UniversalState(params=params, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                          step=steps.pop() if steps else 0, param_groups=param_groups,
                          extra=extra, tags=tags, buffers=buffers)
