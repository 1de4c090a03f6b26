"""Stateful containers and the split of their state into tensors and JSON.

The checkpointer sees `{name: Stateful}` and nothing else. Their state dicts
are split: tensors (model weights, Adam moments) go to DCP under dotted
global names (`model.layers.0.attention.wq.weight`,
`optim.state.layers.0.attention.wq.weight.exp_avg`); everything else (step,
data cursor, schedule, hyper-parameters) goes to the manifest as JSON.
Neither part depends on the layout that saved it.
"""

from __future__ import annotations

from typing import Any, Optional

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

    `state_dict` is taken at every memory snapshot, so after the first one
    (torch's `get_state_dict`) each part answers from a `CachedPartState`:
    the same entries, read from the live optimizer, with no per-step work of
    torch's. A restore drops the caches.
    """

    top_level = True

    def __init__(self, parts: list[tuple[nn.Module, torch.optim.Optimizer]]):
        self.parts = parts
        self._cached: list[Optional[CachedPartState]] = [None] * len(parts)

    def state_dict(self) -> dict[str, Any]:
        merged: dict[str, dict] = {"model": {}, "optim": {}}
        for index, (model, optimizer) in enumerate(self.parts):
            cached = self._cached[index]
            answer = cached.state_dict() if cached is not None else None
            if answer is None:
                answer = get_state_dict(model, optimizer, options=_OPTIONS)
                self._cached[index] = CachedPartState.of(model, optimizer, *answer)
            merged["model"].update(answer[0])
            merged["optim"].update(answer[1])
        return merged

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._cached = [None] * len(self.parts)  # the optimizer's state is replaced below
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


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return getattr(tensor, "_local_tensor", tensor)  # a DTensor's shard, without to_local()


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return _local(tensor) is not tensor


def _memory(tensor: torch.Tensor) -> tuple:
    local = _local(tensor)
    return local.data_ptr(), tuple(local.shape), local.stride(), local.storage_offset(), local.dtype


class CachedPartState:
    """One part's `get_state_dict` answer, kept and refreshed from the live objects.

    Model entries are the same detached tensors while the parameters they view
    keep their memory; optimizer entries are read again from the optimizer at
    every call (its moments and its groups' hyper-parameters, such as the
    learning rate, which changes every step). Built only when every entry maps
    onto a live object; any change it cannot follow (a parameter moved to new
    memory, a state entry more or less) makes `state_dict` answer None, and
    the caller asks torch again.
    """

    def __init__(self, model_entries: list, optim_entries: list, optimizer: torch.optim.Optimizer,
                 state_sizes: list):
        self.model_entries = model_entries  # (fqn, detached tensor, live tensor, memory of the live one)
        self.optim_entries = optim_entries  # (key, "state", param, name) | (key, "group", index, name)
        self.optimizer = optimizer
        self.state_sizes = state_sizes  # (param, number of its state entries)

    @classmethod
    def of(cls, model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict,
           optim_sd: dict) -> Optional["CachedPartState"]:
        live = {_memory(t): t for t in [*model.parameters(), *model.buffers()]}
        model_entries = []
        for fqn, value in model_sd.items():
            source = live.get(_memory(value)) if isinstance(value, torch.Tensor) else None
            if source is None or _is_dtensor(source) != _is_dtensor(value) or source.shape != value.shape:
                return None
            model_entries.append((fqn, value, source, _memory(source)))
        state_of = {id(v): (p, name) for p, state in optimizer.state.items() for name, v in state.items()
                    if isinstance(v, torch.Tensor)}
        param_fqn = {}
        optim_entries = []
        for key, value in optim_sd.items():
            if key.startswith("state.") and id(value) in state_of:
                param, name = state_of[id(value)]
                if not key.endswith(f".{name}"):
                    return None
                param_fqn[id(param)] = key[len("state."):-len(name) - 1]
                optim_entries.append((key, "state", param, name))
            elif not key.startswith("param_groups."):
                return None
        group_of = {param_fqn[id(p)]: index for index, group in enumerate(optimizer.param_groups)
                    for p in group["params"] if id(p) in param_fqn}
        for key, value in optim_sd.items():
            if key.startswith("param_groups."):
                fqn, _, name = key[len("param_groups."):].rpartition(".")
                index = group_of.get(fqn)
                if index is None or optimizer.param_groups[index].get(name, _MISSING) is not value:
                    return None
                optim_entries.append((key, "group", index, name))
        if len(optim_entries) != len(optim_sd):
            return None
        order = {key: position for position, key in enumerate(optim_sd)}
        optim_entries.sort(key=lambda entry: order[entry[0]])
        state_sizes = [(p, len(state)) for p, state in optimizer.state.items()]
        if sum(size for _, size in state_sizes) != sum(1 for entry in optim_entries if entry[1] == "state"):
            return None  # a state entry that is not a tensor: not followed here
        cached = cls(model_entries, optim_entries, optimizer, state_sizes)
        again = cached.state_dict()  # the same entries, in the same order, the same objects
        if again is None or any([(k, id(v)) for k, v in mine.items()] != [(k, id(v)) for k, v in theirs.items()]
                                for mine, theirs in zip(again, (model_sd, optim_sd))):
            return None
        return cached

    def state_dict(self) -> Optional[tuple[dict, dict]]:
        optimizer = self.optimizer
        if len(optimizer.state) != len(self.state_sizes) or any(
                len(optimizer.state.get(p, ())) != size for p, size in self.state_sizes):
            return None
        model_sd = {}
        for fqn, detached, source, memory in self.model_entries:
            if _memory(source) != memory:
                return None
            model_sd[fqn] = detached
        state, groups = optimizer.state, optimizer.param_groups
        optim_sd = {}
        for key, kind, owner, name in self.optim_entries:
            where = state[owner] if kind == "state" else groups[owner]
            if name not in where:
                return None
            optim_sd[key] = where[name]
        return model_sd, optim_sd


_MISSING = object()


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
