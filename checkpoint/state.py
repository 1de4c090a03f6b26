"""Stateful containers and the split of their state into tensors and JSON.

The checkpointer sees `{name: Stateful}` and nothing else. Their state dicts
are split: tensors (model weights, Adam moments) go to DCP under dotted
global names (`model.layers.0.attention.wq.weight`,
`optim.state.layers.0.attention.wq.weight.exp_avg`); everything else (step,
data cursor, schedule, hyper-parameters) goes to the manifest as JSON.
Neither part depends on the layout that saved it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.checkpoint.stateful import Stateful

from atoll.checkpoint.manifest import CheckpointError

_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
MODEL_PREFIX = "model."  # the model's tensors in a checkpoint: model.<fqn>


class ModelOptimizerState(Stateful):
    """Model parts and their optimizers, keyed by parameter name with global shapes.

    Its tensors are named `model.<fqn>` and `optim.state.<fqn>.<moment>`
    whatever name the container is registered under. A pipeline rank holds
    several parts (each a pruned copy of the model with the original names);
    their state dicts are disjoint and merge into one.
    """

    top_level = True

    def __init__(self, parts: list[tuple[nn.Module, torch.optim.Optimizer]]):
        self.parts = parts

    def state_dict(self) -> dict[str, Any]:
        merged: dict[str, dict] = {"model": {}, "optim": {}}
        for model, optimizer in self.parts:
            model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
            merged["model"].update(model_sd)
            merged["optim"].update(optim_sd)
        return merged

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for model, optimizer in self.parts:
            own_model, own_optim = get_state_dict(model, optimizer, options=_OPTIONS)
            # A missing entry is an error, never a silently fresh moment or hyper-parameter.
            missing = [f"model.{k}" for k in own_model if k not in state_dict["model"]] + \
                [f"optim.{k}" for k in own_optim if k not in state_dict["optim"]]
            if missing:
                raise CheckpointError(f"the saved model and optimizer state lacks {len(missing)} entries: "
                                      f"{', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
            set_state_dict(model, optimizer,
                           model_state_dict={k: state_dict["model"][k] for k in own_model},
                           optim_state_dict={k: state_dict["optim"][k] for k in own_optim},
                           options=_OPTIONS)


class ModelWeightsState(Stateful):
    """Only the model of `ModelOptimizerState` (`model.<fqn>`): what a run that starts from
    another run's weights (fine-tuning, an imported model) takes from its checkpoint."""

    top_level = True

    def __init__(self, parts: list[nn.Module]):
        self.parts = parts

    def state_dict(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for model in self.parts:
            merged.update(get_model_state_dict(model, options=_OPTIONS))
        return {"model": merged}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for model in self.parts:
            own = get_model_state_dict(model, options=_OPTIONS)
            set_model_state_dict(model, {k: state_dict["model"][k] for k in own}, options=_OPTIONS)


class ValueState(Stateful):
    """A dict of plain values (train progress, ids) as a Stateful."""

    def __init__(self, **values: Any):
        self.values = dict(values)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.values.update(state_dict)


def split_state(states: dict[str, Stateful]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(flat dotted-name tensors, nested JSON of everything that is not a tensor)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, prefix: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[prefix] = node
            return None
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                kept = walk(value, f"{prefix}.{key}" if prefix else str(key))
                if kept is not None or not isinstance(value, torch.Tensor):
                    out[str(key)] = kept
            return out
        if isinstance(node, (list, tuple)):
            if any(isinstance(v, torch.Tensor) for v in node):
                raise TypeError(f"state entry {prefix} mixes tensors into a list")
            return [walk(v, prefix) for v in node]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"state entry {prefix} has type {type(node).__name__}, not JSON-able")

    json_state = {name: walk(state.state_dict(), tensor_prefix(name, state))
                  for name, state in states.items()}
    return tensors, json_state


def tensor_prefix(name: str, state: Stateful) -> str:
    return "" if getattr(state, "top_level", False) else name


def merge_json(template: Any, saved: Any, prefix: str = "") -> Any:
    """Put saved JSON values into a template state dict, keeping its tensors and tuples."""
    if isinstance(template, torch.Tensor):
        return template
    if isinstance(template, dict) and isinstance(saved, dict):
        merged = dict(template)
        for key, value in saved.items():
            merged[key] = merge_json(template.get(key), value, f"{prefix}.{key}")
        return merged
    if isinstance(template, tuple) and isinstance(saved, list):
        return tuple(saved)
    return saved


def put_tensors(node: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """The state dict with its tensors replaced by the loaded ones of the same name."""
    if isinstance(node, torch.Tensor):
        return tensors[prefix]
    if isinstance(node, dict):
        return {k: put_tensors(v, tensors, f"{prefix}.{k}" if prefix else str(k))
                for k, v in node.items()}
    return node


def restore_states(states: dict[str, Stateful], tensors: dict[str, torch.Tensor],
                   json_state: dict[str, Any]) -> None:
    """Load each state from loaded tensors (dotted names, as `split_state` gave them) and saved JSON."""
    for name, state in states.items():
        restored = put_tensors(state.state_dict(), tensors, tensor_prefix(name, state))
        state.load_state_dict(merge_json(restored, json_state.get(name, {})))
