"""Memory snapshots on Ray: shared-memory slots on every node, one keeper actor per node.

A rank copies its shard straight into a slot in its node's /dev/shm
(checkpoint/snapshot_store.py's `ShmSnapshotStore`, one folder per node and
run): no copy besides that one and no call to anyone, so a snapshot of every
step stays cheap. The files outlive the worker processes; the driver starts a
`SnapshotKeeper` on every node (no CPU reserved, pinned to its node) that
answers for its node's folder (what is held, a shard for a rank on another
node), holds replicas, and removes the folder at the end of the run.
`checkpoint.memory_replicas` keepers on other nodes copy each shard onto
their own nodes before the rank's snapshot is done, so a snapshot the
coordinator marks complete survives the loss of any one node (keeper
included); the meta that completes a step goes to every node. `latest()`
merges what the live keepers hold. The training side only sees the
`SnapshotStore` interface (checkpoint/snapshot.py).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from atoll.checkpoint.manifest import CheckpointError
from atoll.checkpoint.snapshot_store import Shard, ShmSnapshotStore, SnapshotStore, missing_shards

KEEPER_CALL_TIMEOUT_S = 10.0


def node_root(base: str, node: str) -> Path:
    """The /dev/shm folder of `node`'s snapshots in the run whose folders start with `base`
    (several nodes may share one machine, and so one /dev/shm)."""
    return Path(f"{base}-{node[:16]}")


class SnapshotKeeper:
    """Answers for the snapshots of one node (wrapped with ray.remote by the driver)."""

    def __init__(self, node: str, base: str):
        # A keeper asks Ray for no GPU, and Ray then shows it every GPU of the node. It holds
        # host memory only: hiding the GPUs keeps anything in it from opening a CUDA context
        # (hundreds of MB) on a GPU that a rank trains on.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        self.node = node
        self.local = ShmSnapshotStore(node_root(base, node))
        shutil.rmtree(self.local.root, ignore_errors=True)  # a new keeper: nothing there is this run's
        self.shards: dict[tuple[int, int], Any] = {}  # (step, rank) -> replica ObjectRef this keeper owns
        self.meta: dict[int, tuple[int, bytes]] = {}  # step -> (world, meta) put from another node

    def __repr__(self) -> str:
        return f"keeper-{self.node[:8]}"

    def hold(self, step: int, rank: int, shard) -> bool:
        """Own a copy of a shard from another node: an object dies with its node and its owner."""
        import ray

        self.shards[(step, rank)] = ray.put(shard)
        return True

    def put_meta(self, step: int, world: int, meta: bytes) -> bool:
        self.meta[step] = (world, meta)
        return True

    def holdings(self) -> dict[int, dict]:
        steps = self.local.holdings()
        for step, rank in self.shards:
            steps.setdefault(step, {"world": None, "ranks": []})["ranks"].append(rank)
        for step, (world, _) in self.meta.items():
            steps.setdefault(step, {"world": None, "ranks": []})["world"] = world
        return steps

    def shard(self, step: int, rank: int) -> Optional[list]:
        import ray

        ref = self.shards.get((step, rank))
        if ref is None:
            try:
                ref = ray.put(np.array(self.local.get_shard(step, rank)))
            except CheckpointError:
                return None
        return [ref]

    def get_meta(self, step: int) -> Optional[bytes]:
        found = self.meta.get(step)
        if found is not None:
            return found[1]
        try:
            return self.local.get_meta(step)
        except CheckpointError:
            return None

    def retain(self, step: int) -> None:
        for key in [k for k in self.shards if k[0] < step]:
            del self.shards[key]
        for key in [k for k in self.meta if k < step]:
            del self.meta[key]
        self.local.retain(step)

    def drop(self, step: int) -> None:
        for key in [k for k in self.shards if k[0] == step]:
            del self.shards[key]
        self.meta.pop(step, None)
        self.local.drop(step)

    def clear(self) -> None:
        self.shards.clear()
        self.meta.clear()
        self.local.clear()


def start_keepers(nodes: list[str], base: str, existing: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """A keeper on every node in `nodes` that has none yet (its node's folder: `base`, see
    `node_root`); returns node -> handle."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    keepers = dict(existing or {})
    actor_cls = ray.remote(num_cpus=0, max_restarts=0)(SnapshotKeeper)
    for node in nodes:
        if node not in keepers:
            keepers[node] = actor_cls.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False)
            ).remote(node, base)
    # Only new keepers are waited for: a restart must not queue behind one busy holding a shard.
    ray.get([k.holdings.remote() for node, k in keepers.items() if node not in (existing or {})], timeout=60)
    return keepers


def live_keepers(keepers: dict[str, Any], alive_nodes: set[str]) -> dict[str, Any]:
    return {node: k for node, k in keepers.items() if node in alive_nodes}


class RaySnapshotStore(SnapshotStore):
    """This node's folder and the keepers of the nodes alive when the group started, as a
    SnapshotStore (`base`: where the run's node folders start, see `node_root`)."""

    def __init__(self, keepers: dict[str, Any], replicas: int, base: str, avoid: frozenset = frozenset()):
        self.keepers = dict(sorted(keepers.items()))
        self.replicas = min(replicas, max(0, len(self.keepers) - 1))
        self.base = base
        self.avoid = set(avoid)  # nodes left out of the run: replicas go there last
        self._here: Optional[tuple[str, Optional[ShmSnapshotStore]]] = None

    def __getstate__(self) -> dict:  # pickled into every training process: addresses only
        return {k: v for k, v in self.__dict__.items() if k != "_here"} | {"_here": None}

    def _node(self) -> tuple[str, Optional[ShmSnapshotStore]]:
        """(this process's node, its folder's store, or None where the node has no keeper)."""
        if self._here is None:
            import ray

            node = ray.get_runtime_context().get_node_id()
            self._here = (node, ShmSnapshotStore(node_root(self.base, node)) if node in self.keepers else None)
        return self._here

    def _targets(self) -> tuple[Optional[Any], list[Any]]:
        """(this node's keeper or None, the keepers of the next `replicas` nodes in ring order,
        nodes to avoid last)."""
        nodes = list(self.keepers)
        here, _ = self._node()
        if here not in nodes:  # a node that joined after the group started has no keeper yet
            ring = sorted(nodes, key=lambda n: n in self.avoid)
            return None, [self.keepers[n] for n in ring[:self.replicas + 1]]
        start = nodes.index(here)
        ring = sorted((nodes[(start + i) % len(nodes)] for i in range(1, len(nodes))),
                      key=lambda n: n in self.avoid)
        return self.keepers[here], [self.keepers[n] for n in ring[:self.replicas]]

    def shard_buffer(self, step: int, rank: int, nbytes: int) -> Optional[np.ndarray]:
        local = self._node()[1]
        return None if local is None else local.shard_buffer(step, rank, nbytes)

    def commit_shard(self, step: int, rank: int) -> None:
        self._node()[1].commit_shard(step, rank)
        self._replicate(step, rank)

    def put_shard(self, step: int, rank: int, data: Union[Shard, np.ndarray]) -> None:
        """Into this node's folder, then to the replicas; from a node without a keeper, to keepers."""
        import ray

        local = self._node()[1]
        if local is not None:
            local.put_shard(step, rank, data)
            self._replicate(step, rank)
            return
        _, remote = self._targets()
        shard = Shard.of(data)
        source = ray.put((shard.nbytes, shard.pieces))
        ray.get([k.hold.remote(step, rank, source) for k in remote], timeout=KEEPER_CALL_TIMEOUT_S * 3)

    def _replicate(self, step: int, rank: int) -> None:
        """Copies of a shard in this node's folder on the replicas' nodes. This rank asks, not
        the keeper: keepers asking each other could each wait for the other."""
        import ray

        local, remote = self._targets()
        if remote:
            source = ray.get(local.shard.remote(step, rank), timeout=KEEPER_CALL_TIMEOUT_S * 3)[0]
            # Passed by reference at the top level: each replica gets the value on its node.
            ray.get([k.hold.remote(step, rank, source) for k in remote], timeout=KEEPER_CALL_TIMEOUT_S * 3)

    def put_meta(self, step: int, world: int, meta: bytes) -> None:
        import ray

        here, local = self._node()
        if local is not None:
            local.put_meta(step, world, meta)
        others = [k for node, k in self.keepers.items() if node != here or local is None]
        ray.get([k.put_meta.remote(step, world, meta) for k in others], timeout=KEEPER_CALL_TIMEOUT_S)

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
        return missing_shards(world, ranks)

    def complete(self) -> list[int]:
        merged = self._merged()  # one round of questions, not one per step
        return sorted(step for step, (world, ranks) in merged.items() if missing_shards(world, ranks) is None)

    def latest(self) -> Optional[int]:
        complete = self.complete()
        return complete[-1] if complete else None

    def get_shard(self, step: int, rank: int):
        import ray

        local = self._node()[1]
        if local is not None:  # on this node: mapped, not copied
            try:
                return local.get_shard(step, rank)
            except CheckpointError:
                pass
        for boxed in self._ask_all("shard", step, rank):
            if boxed is not None:
                try:
                    value = ray.get(boxed[0], timeout=KEEPER_CALL_TIMEOUT_S * 3)
                except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                    continue
                return value if isinstance(value, np.ndarray) else Shard(*value).contiguous()
        raise CheckpointError(f"no live keeper holds rank {rank} of memory snapshot step {step}")

    def get_meta(self, step: int) -> bytes:
        local = self._node()[1]
        if local is not None:
            try:
                return local.get_meta(step)
            except CheckpointError:
                pass
        for meta in self._ask_all("get_meta", step):
            if meta is not None:
                return meta
        raise CheckpointError(f"no live keeper holds the metadata of memory snapshot step {step}")

    def retain(self, step: int) -> None:
        here, local = self._node()
        if local is not None:
            local.retain(step)
        for node, keeper in self.keepers.items():  # replicas elsewhere; nothing waits for it
            if node != here or local is None:
                keeper.retain.remote(step)

    def drop(self, step: int) -> None:
        self._ask_all("drop", step)

    def clear(self) -> None:
        self._ask_all("clear")

    def close(self) -> None:
        if self._here is not None and self._here[1] is not None:
            self._here[1].close()
