"""Memory snapshots on Ray: one keeper actor per node, outliving the worker groups.

The driver starts a `SnapshotKeeper` on every node (no CPU reserved, pinned
to its node). A worker's `RaySnapshotStore.put_shard` has its node's keeper
pull the shard: the keeper calls the worker actor's `export_shard`, and the
object that answer creates is owned by the keeper (an object dies with its
owner, and a worker's own objects die with the worker), at the cost of one
copy of the live tensors. `checkpoint.memory_replicas` keepers on other
nodes then copy it onto their own nodes. It returns once every copy exists, so
a snapshot the coordinator marks complete survives the loss of any one node
(keeper included). `latest()`
merges what the live keepers hold. The training side only sees the
`SnapshotStore` interface (checkpoint/snapshot.py).
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Optional, Union

import numpy as np

from atoll.checkpoint.manifest import CheckpointError
from atoll.checkpoint.snapshot_store import Shard, SnapshotStore

KEEPER_CALL_TIMEOUT_S = 10.0


class SnapshotKeeper:
    """Holds the snapshot shards of one node (wrapped with ray.remote by the driver)."""

    def __init__(self, node: str):
        # A keeper asks Ray for no GPU, and Ray then shows it every GPU of the node. It holds
        # host memory only: hiding the GPUs keeps anything in it from opening a CUDA context
        # (hundreds of MB) on a GPU that a rank trains on.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        self.node = node
        self.shards: dict[tuple[int, int], Any] = {}  # (step, rank) -> ObjectRef this keeper owns
        self.meta: dict[int, tuple[int, bytes]] = {}  # step -> (world, meta)

    def __repr__(self) -> str:
        return f"keeper-{self.node[:8]}"

    def pull(self, step: int, rank: int, worker, token: str) -> list:
        """Ask the worker (an actor on this node) for its shard: the object its answer
        creates is owned by this keeper, so it outlives the worker, with one copy."""
        import ray

        ref = worker.export_shard.remote(token)
        ray.get(ref, timeout=KEEPER_CALL_TIMEOUT_S * 3)  # on this node: mapped, not copied
        self.shards[(step, rank)] = ref
        return [ref]

    def hold(self, step: int, rank: int, shard) -> bool:
        """Own a copy of a shard from another node: an object dies with its node and its owner."""
        import ray

        self.shards[(step, rank)] = ray.put(shard)
        return True

    def put_meta(self, step: int, world: int, meta: bytes) -> bool:
        self.meta[step] = (world, meta)
        return True

    def holdings(self) -> dict[int, dict]:
        steps: dict[int, dict] = {}
        for step, rank in self.shards:
            steps.setdefault(step, {"world": None, "ranks": []})["ranks"].append(rank)
        for step, (world, _) in self.meta.items():
            steps.setdefault(step, {"world": None, "ranks": []})["world"] = world
        return steps

    def shard(self, step: int, rank: int) -> Optional[list]:
        ref = self.shards.get((step, rank))
        return None if ref is None else [ref]

    def get_meta(self, step: int) -> Optional[bytes]:
        found = self.meta.get(step)
        return None if found is None else found[1]

    def retain(self, step: int) -> None:
        for key in [k for k in self.shards if k[0] < step]:
            del self.shards[key]
        for key in [k for k in self.meta if k < step]:
            del self.meta[key]

    def drop(self, step: int) -> None:
        for key in [k for k in self.shards if k[0] == step]:
            del self.shards[key]
        self.meta.pop(step, None)

    def clear(self) -> None:
        self.shards.clear()
        self.meta.clear()


def start_keepers(nodes: list[str], existing: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """A keeper on every node in `nodes` that has none yet; returns node -> handle."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    keepers = dict(existing or {})
    actor_cls = ray.remote(num_cpus=0, max_restarts=0)(SnapshotKeeper)
    for node in nodes:
        if node not in keepers:
            keepers[node] = actor_cls.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False)
            ).remote(node)
    # Only new keepers are waited for: a restart must not queue behind one busy holding a shard.
    ray.get([k.holdings.remote() for node, k in keepers.items() if node not in (existing or {})], timeout=60)
    return keepers


def live_keepers(keepers: dict[str, Any], alive_nodes: set[str]) -> dict[str, Any]:
    return {node: k for node, k in keepers.items() if node in alive_nodes}


class RaySnapshotStore(SnapshotStore):
    """The keepers of the nodes alive when the group started, as a SnapshotStore."""

    def __init__(self, keepers: dict[str, Any], replicas: int, avoid: frozenset = frozenset()):
        self.keepers = dict(sorted(keepers.items()))
        self.replicas = min(replicas, max(0, len(self.keepers) - 1))
        self.avoid = set(avoid)  # nodes left out of the run: replicas go there last

    def _targets(self) -> tuple[Optional[Any], list[Any]]:
        """(this node's keeper or None, the keepers of the next `replicas` nodes in ring order,
        nodes to avoid last)."""
        import ray

        nodes = list(self.keepers)
        here = ray.get_runtime_context().get_node_id()
        if here not in nodes:  # a node that joined after the group started has no keeper yet
            ring = sorted(nodes, key=lambda n: n in self.avoid)
            return None, [self.keepers[n] for n in ring[:self.replicas + 1]]
        start = nodes.index(here)
        ring = sorted((nodes[(start + i) % len(nodes)] for i in range(1, len(nodes))),
                      key=lambda n: n in self.avoid)
        return self.keepers[here], [self.keepers[n] for n in ring[:self.replicas]]

    def put_shard(self, step: int, rank: int, data: Union[Shard, np.ndarray]) -> None:
        """This node's keeper pulls the shard from the worker (one copy); replicas copy that."""
        import ray

        shard = Shard.of(data)
        local, remote = self._targets()
        worker = _current_actor()
        if local is not None and worker is not None:
            token = f"{step}-{rank}-{uuid.uuid4().hex}"
            _EXPORTS[token] = shard
            try:
                source = ray.get(local.pull.remote(step, rank, worker, token),
                                 timeout=KEEPER_CALL_TIMEOUT_S * 3)[0]
            finally:
                _EXPORTS.pop(token, None)
        else:  # no keeper here, or not called from an actor: put it, and every keeper copies it
            source = ray.put(_exported(shard))
            remote = ([local] if local is not None else []) + remote
        # Passed by reference at the top level: each replica gets the value on its node.
        ray.get([k.hold.remote(step, rank, source) for k in remote], timeout=KEEPER_CALL_TIMEOUT_S * 3)

    def put_meta(self, step: int, world: int, meta: bytes) -> None:
        import ray

        ray.get([k.put_meta.remote(step, world, meta) for k in self.keepers.values()],
                timeout=KEEPER_CALL_TIMEOUT_S)

    def _ask_all(self, method: str, *args) -> list:
        """Answers of the keepers still alive (a lost node's keeper is skipped)."""
        import ray

        refs = [getattr(k, method).remote(*args) for k in self.keepers.values()]
        answers = []
        for ref in refs:
            try:
                answers.append(ray.get(ref, timeout=KEEPER_CALL_TIMEOUT_S))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                continue
        return answers

    def _merged(self) -> dict[int, tuple[Optional[int], set]]:
        """step -> (world from the meta, ranks held by some live keeper)."""
        merged: dict[int, tuple[Optional[int], set]] = {}
        for holdings in self._ask_all("holdings"):
            for step, held in holdings.items():
                world, ranks = merged.get(step, (None, set()))
                merged[step] = (held["world"] if held["world"] is not None else world,
                                ranks | set(held["ranks"]))
        return merged

    def steps(self) -> list[int]:
        return sorted(self._merged())

    def missing(self, step: int) -> Optional[str]:
        world, ranks = self._merged().get(step, (None, set()))
        return _missing(world, ranks)

    def complete(self) -> list[int]:
        merged = self._merged()  # one round of questions, not one per step
        return sorted(step for step, (world, ranks) in merged.items() if _missing(world, ranks) is None)

    def latest(self) -> Optional[int]:
        complete = self.complete()
        return complete[-1] if complete else None

    def get_shard(self, step: int, rank: int):
        import ray

        for boxed in self._ask_all("shard", step, rank):
            if boxed is not None:
                try:
                    nbytes, pieces = ray.get(boxed[0], timeout=KEEPER_CALL_TIMEOUT_S * 3)
                except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                    continue
                return Shard(nbytes, pieces).contiguous()
        raise CheckpointError(f"no live keeper holds rank {rank} of memory snapshot step {step}")

    def get_meta(self, step: int) -> bytes:
        for meta in self._ask_all("get_meta", step):
            if meta is not None:
                return meta
        raise CheckpointError(f"no live keeper holds the metadata of memory snapshot step {step}")

    def retain(self, step: int) -> None:
        self._ask_all("retain", step)

    def drop(self, step: int) -> None:
        self._ask_all("drop", step)

    def clear(self) -> None:
        self._ask_all("clear")

    def close(self) -> None:
        pass


# Shards waiting for their node's keeper to pull them (`TrainWorker.export_shard`).
_EXPORTS: dict[str, Shard] = {}


def _exported(shard: Shard) -> tuple[int, list]:
    """What a keeper's object holds: numpy pieces travel out of band, copied once."""
    return shard.nbytes, shard.pieces


def _current_actor():
    import ray

    try:
        return ray.get_runtime_context().current_actor
    except RuntimeError:  # a driver or task, not an actor
        return None


def take_export(token: str) -> tuple[int, list]:
    """The shard a keeper pulls, for the worker actor's `export_shard`."""
    return _exported(_EXPORTS.pop(token))


def _missing(world: Optional[int], ranks: set) -> Optional[str]:
    if world is None:
        return "no meta" if ranks else "nothing stored"
    absent = sorted(set(range(world)) - ranks)
    return f"no shard of rank {', '.join(map(str, absent))} (of {world})" if absent else None
