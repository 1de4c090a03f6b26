"""Run a recipe on Ray under the supervisor: worker groups, keepers, events.

The driver starts a local Ray cluster or joins `launch.ray_address`. A
cluster atoll starts itself stays on this machine: Ray otherwise swaps
127.0.0.1 for the machine's external address and binds its servers to every
interface, and keeps loopback only when RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
is in the environment of the process that starts it; its health checks are
tightened so that a lost node shows within a few seconds. A cluster the user
names is theirs: atoll changes none of its settings.

Each rank asks Ray for `launch.gpus_per_worker` GPUs of its own (by default
1 when the cluster has GPUs, else none; launch/worker_group.py).

A node the supervisor leaves out (a straggler's, launch/eviction.py) is held by
a placement group pinned to it that reserves all its CPUs and GPUs, so no
bundle of a later group lands there and `capacity()` leaves it out; it is
removed when the node is released and when the run ends.

Then: one snapshot keeper per node (launch/keepers.py), and the supervisor
(launch/supervisor.py) drives `RayWorkerGroup`s (launch/worker_group.py)
until the run finishes, fails for good, or a signal stops it (every rank
stops at a step boundary with a checkpoint, see launch/signals.py). Worker
output reaches the driver prefixed with the worker's rank.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import DictConfig

from atoll.launch.signals import GracefulStop
from atoll.launch.supervisor import Supervisor, UserError, WorkerFailed
from atoll.launch.worker_group import ActorPool, RayWorkerGroup
from atoll.trainer.config import memory_tier_on

# Worker output reaches the driver through Ray's log monitor (which polls the
# workers' files every 0.1 s), after the result does: the last lines (the run
# summary, a traceback) get until the driver has printed nothing for
# LOG_QUIET_S, at most LOG_DRAIN_S.
LOG_DRAIN_S = 2.0
LOG_QUIET_S = 0.75
# Ray's defaults notice a dead node after 15-55 s; these make it 1.5-2 s.
HEALTH_CHECKS = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 500,
                 "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# How long a node left out may take to be held (the stopped group's resources free up first).
HOLD_WAIT_S = 30.0
NODE_ID_LABEL = "ray.io/node-id"  # every Ray node carries its id as this label

__all__ = ["run_on_ray", "WorkerFailed", "ray_init_options", "gpus_per_worker"]


def ray_init_options(cfg: DictConfig) -> dict:
    """ray.init arguments for a cluster atoll starts itself (loopback, tight health checks; an
    object store of `launch.ray_object_store_mb`, or with `auto` sized from the snapshots the
    memory tier puts there, see parallel/memory_plan.py)."""
    from atoll.parallel.memory_plan import object_store_bytes
    from atoll.trainer.config import world_size

    world = world_size(cfg)
    return dict(num_cpus=world * cfg.launch.cpus_per_worker, _node_ip_address="127.0.0.1",
                object_store_memory=object_store_bytes(cfg),
                _system_config=dict(HEALTH_CHECKS))


def _names_loopback(address: str) -> bool:
    """Whether `launch.ray_address` (or RAY_ADDRESS, for `auto`) is a cluster on loopback."""
    from atoll.parallel.layout import is_loopback

    if address == "auto":
        address = os.environ.get("RAY_ADDRESS", "")
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return bool(host) and is_loopback(host)


def _init_ray(cfg: DictConfig) -> None:
    import ray

    common = dict(include_dashboard=False, log_to_driver=True, configure_logging=True,
                  logging_level="WARNING")
    if cfg.launch.ray_address:
        try:
            ray.init(address=cfg.launch.ray_address, **common)
        except ConnectionError as exc:
            # A job's driver inherits the cluster's authentication mode; a driver started from
            # a shell must be told (setting it unasked would break clusters without tokens).
            hint = ("; a cluster started with `ray start` may require token authentication: set "
                    "RAY_AUTH_MODE=token (the token comes from ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH "
                    "or RAY_AUTH_TOKEN)") if os.environ.get("RAY_AUTH_MODE") != "token" else ""
            raise WorkerFailed(f"cannot join the Ray cluster at {cfg.launch.ray_address}: "
                               f"{str(exc).splitlines()[0]}{hint}") from None
        return
    ray.init(**ray_init_options(cfg), **common)


def gpus_per_worker(cfg: DictConfig) -> int:
    """`launch.gpus_per_worker`, or its default on the cluster joined: 1 when it has GPUs, else 0.
    (An autoscaling cluster with no GPU node up yet has none: such a recipe names the key.)"""
    import ray

    if cfg.launch.gpus_per_worker is not None:
        return int(cfg.launch.gpus_per_worker)
    return 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0


def _alive_nodes() -> list[str]:
    import ray

    return sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))


class RayGroupFactory:
    """What the supervisor needs from Ray: groups, capacity, the snapshot store."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.cpus = cfg.launch.cpus_per_worker
        self.gpus = gpus_per_worker(cfg)
        self.memory = memory_tier_on(cfg)
        self.keepers: dict[str, Any] = {}
        self.snapshot_base = ""  # where the run's node folders of snapshots start (keepers.node_root)
        self.pool = ActorPool(self.gpus)
        self.outer_store = None
        self.held: dict[str, Any] = {}  # node left out -> the placement group holding it

    def group(self, recipe: dict, world: int, placement_timeout_s: float) -> RayWorkerGroup:
        islands = recipe["diloco"]["islands"]
        return RayWorkerGroup(self.cpus, world, placement_timeout_s, self.pool, islands=islands,
                              outer_store=self._outer_store_address() if islands > 1 else "",
                              gpus_per_worker=self.gpus, cluster_fixed=not self.cfg.launch.ray_address)

    def _outer_store_address(self) -> str:
        """A store in the driver that outlives every island: where islands meet (DiLoCo)."""
        if self.outer_store is None:
            import datetime

            import ray

            from atoll.parallel.layout import serve_store

            ip = ray.util.get_node_ip_address()
            self.outer_store = serve_store(ip, 0, datetime.timedelta(seconds=300))
        return f"{self.outer_store.host}:{self.outer_store.port}"

    def capacity(self, running_world: int) -> int:
        import ray

        free = ray.available_resources()
        fit = (free.get("CPU", 0.0) + running_world * self.cpus) // self.cpus
        if self.gpus:
            fit = min(fit, (free.get("GPU", 0.0) + running_world * self.gpus) // self.gpus)
        return int(fit)

    def exclude(self, node: str) -> None:
        """Keep `node` out of later groups: a placement group pinned to it takes all its CPUs
        and GPUs (a reservation, no process). Waits until it holds them, so that the next
        group's bundles cannot land there first."""
        import ray
        from ray.util.placement_group import placement_group

        total = next((n["Resources"] for n in ray.nodes() if n["NodeID"] == node and n.get("Alive")), None)
        if total is None or node in self.held:
            return
        bundle = {k: total[k] for k in ("CPU", "GPU") if total.get(k)}
        if not bundle:
            return
        try:
            hold = placement_group([bundle], strategy="STRICT_PACK", name=f"atoll-left-out-{node[:8]}",
                                   bundle_label_selector=[{NODE_ID_LABEL: node}])
            ready = hold.ready()
        except TypeError:  # Ray before label selectors (< 2.46): an idle actor pinned there holds them
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            hold = ray.remote(_NodeHolder).options(
                num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0), max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False)).remote()
            ready = hold.ready.remote()
        self.held[node] = hold
        if not ray.wait([ready], timeout=HOLD_WAIT_S)[0]:
            print(f"ray: node {node} is not free to hold within {HOLD_WAIT_S:g}s; it is held once "
                  "its resources are free", flush=True)

    def release(self, node: str) -> None:
        import ray
        from ray.util.placement_group import PlacementGroup

        hold = self.held.pop(node, None)
        with contextlib.suppress(Exception):
            if isinstance(hold, PlacementGroup):
                ray.util.remove_placement_group(hold)
            elif hold is not None:
                ray.kill(hold, no_restart=True)

    def snapshot_store(self):
        if not self.memory:
            return None
        from atoll.launch.keepers import RaySnapshotStore, live_keepers, start_keepers  # noqa

        if not self.snapshot_base:
            from atoll.checkpoint.snapshot_store import ShmSnapshotStore, shm_root
            from atoll.trainer.config import run_dir

            # One name per invocation; what earlier invocations of this run left here goes.
            root = shm_root(str(run_dir(self.cfg)), uuid.uuid4().hex[:12])
            ShmSnapshotStore.remove_stale(root)
            self.snapshot_base = str(root)
        alive = _alive_nodes()
        self.keepers = start_keepers(alive, self.snapshot_base, live_keepers(self.keepers, set(alive)))
        # A node left out keeps its keeper (the snapshots it holds stay readable); new replicas
        # go to it only when no other node can take them.
        return RaySnapshotStore(self.keepers, self.cfg.checkpoint.memory_replicas, self.snapshot_base,
                                avoid=set(self.held))

    def close(self) -> None:
        import ray

        for node in list(self.held):
            self.release(node)
        self.pool.close()
        self.outer_store = None  # the driver's store server stops with it
        # The snapshots' node folders go with the run: each keeper removes its node's, and the
        # driver whatever is left on its own machine (a lost node's keeper cannot answer).
        cleared = [keeper.clear.remote() for keeper in self.keepers.values()]
        with contextlib.suppress(Exception):
            ray.wait(cleared, num_returns=len(cleared), timeout=10)
        for keeper in self.keepers.values():
            with contextlib.suppress(Exception):
                ray.kill(keeper, no_restart=True)
        if self.snapshot_base:
            from atoll.checkpoint.snapshot_store import ShmSnapshotStore

            ShmSnapshotStore.remove_stale(Path(self.snapshot_base))
        self.keepers = {}


class _NodeHolder:
    """Holds a left-out node's resources where placement groups cannot be pinned to a node."""

    def ready(self) -> bool:
        return True


def _as_user_error(exc: UserError) -> BaseException:
    """The rank's own error type, so the CLI reports it as it would in one process."""
    from atoll.launch.cli import user_errors
    from atoll.trainer.train import TrainingError

    for cls in user_errors() + (TrainingError,):
        if cls.__name__ == exc.type_name:
            return cls(str(exc))
    return WorkerFailed(str(exc))


class _LastPrint:
    """A stream that notes when it was last written to (Ray's log thread prints the
    workers' lines to whatever sys.stdout / sys.stderr are at the time)."""

    at = 0.0  # time.monotonic() of the last write to either stream

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        _LastPrint.at = time.monotonic()
        return self._stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def _noting_prints() -> Iterator[None]:
    before = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _LastPrint(sys.stdout), _LastPrint(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = before


def _drain_worker_logs() -> None:
    """Until nothing has been printed for LOG_QUIET_S (at least that long, at most LOG_DRAIN_S)."""
    start = time.monotonic()
    while True:
        now = time.monotonic()
        if now - start >= LOG_DRAIN_S or now - max(_LastPrint.at, start) >= LOG_QUIET_S:
            return
        time.sleep(0.05)


def run_on_ray(cfg: DictConfig, stop: GracefulStop) -> list[dict[str, Any]]:
    """Run the recipe on Ray worker groups under the supervisor; each rank's final metrics.

    `stop` turns SIGINT/SIGTERM into a stop request while the run is on: the
    supervisor's poll loop checks it (an interrupt raised at an arbitrary point
    inside Ray's own calls could leave the driver unable to tear the group down)."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # read at import; each rank's lines differ
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        # The driver prints each worker line behind a "(rank0 pid=...)" prefix that Ray
        # wraps in colour codes unless this says no: a file or a pipe gets plain text.
        os.environ["RAY_COLOR_PREFIX"] = "0"
    if not cfg.launch.ray_address or _names_loopback(cfg.launch.ray_address):
        # Read when ray is imported, and by what ray.init starts. Without it a
        # driver joining a cluster on 127.0.0.1 looks for it at the external address.
        os.environ.update(LOOPBACK_ENV)
    import ray

    from atoll.trainer.config import run_dir, to_dict
    from atoll.trainer.metrics import record_event
    from atoll.trainer.run_dir import checkpoints_dir
    from atoll.checkpoint.store import committed

    started = time.perf_counter()
    folder = run_dir(cfg)
    factory: Optional[RayGroupFactory] = None
    with stop.installed(), _noting_prints():
        try:
            _init_ray(cfg)
            stop.reclaim()  # a driver's ray.init turns SIGTERM into an immediate exit
            factory = RayGroupFactory(cfg)
            supervisor = Supervisor(
                to_dict(cfg), factory, lambda event, /, **f: record_event(folder, event, **f),
                has_disk_checkpoint=lambda: bool(committed(checkpoints_dir(cfg))),
                interrupted=stop.reason, stop_expired=stop.expired,
                log=lambda line: print(line, flush=True))
            try:
                results = supervisor.run()
            except UserError as exc:
                raise _as_user_error(exc) from None
            _drain_worker_logs()
            return results
        except WorkerFailed:
            _drain_worker_logs()
            raise
        finally:
            if factory is not None:
                factory.close()
            ray.shutdown()
            print(f"ray worker group closed after {time.perf_counter() - started:.1f}s", flush=True)
