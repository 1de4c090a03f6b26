"""Run the entry function on a Ray worker group: one actor per rank.

The driver starts a local Ray cluster bound to 127.0.0.1 (dashboard off) or
joins `launch.ray_address`, reserves one placement-group bundle per rank,
starts one `TrainWorker` actor per bundle with RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT in its environment, and waits. The
group is created, watched and torn down as one unit: if any worker fails,
every actor is killed at once (survivors would otherwise wait out a
collective timeout) and the run ends with a one-line error naming the rank.
Ctrl-C or SIGTERM only sets a flag that the wait loop checks: an interrupt
raised at an arbitrary point inside Ray's own calls could leave the driver
unable to tear the group down. Worker output reaches the driver prefixed with
the worker's rank.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from typing import Any, Optional

from omegaconf import DictConfig

PLACEMENT_TIMEOUT_S = 120.0
WAIT_POLL_S = 0.5  # how often the driver looks for an interrupt while workers train
# Worker output reaches the driver through Ray's log monitor, after the result
# does: give the last lines (the run summary, a traceback) time to arrive.
LOG_DRAIN_S = 2.0


class WorkerFailed(RuntimeError):
    """A worker died or raised; the message names the rank and the cause."""


class TrainWorker:
    """One rank of the run (wrapped with ray.remote at launch time)."""

    def __init__(self, rank: int):
        self.rank = rank

    def __repr__(self) -> str:  # Ray prefixes this actor's log lines with it
        return f"rank{self.rank}"

    def address(self) -> tuple[str, int, str]:
        import ray

        with socket.socket() as sock:  # a free port for the rendezvous store
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port, ray.get_runtime_context().get_node_id()

    def run(self, env: dict[str, str], recipe: dict) -> dict:
        os.environ.update(env)
        from atoll.trainer.train import train

        return train(recipe)


def _init_ray(cfg: DictConfig) -> None:
    import ray

    common = dict(include_dashboard=False, log_to_driver=True, configure_logging=True,
                  logging_level="WARNING")
    if cfg.launch.ray_address:
        ray.init(address=cfg.launch.ray_address, **common)
        return
    world = cfg.parallel.pp * cfg.parallel.dp
    ray.init(num_cpus=world * cfg.launch.cpus_per_worker, _node_ip_address="127.0.0.1",
             object_store_memory=cfg.launch.ray_object_store_mb * 1024 * 1024, **common)


def _local_ranks(node_ids: list[str]) -> list[tuple[int, int]]:
    """(local rank, workers on that node) for each global rank."""
    seen: dict[str, int] = {}
    local = []
    for node in node_ids:
        local.append(seen.get(node, 0))
        seen[node] = seen.get(node, 0) + 1
    return [(rank, seen[node]) for rank, node in zip(local, node_ids)]


class WorkerGroup:
    """One actor per rank in one placement group, created, watched and killed as a unit.

    Every wait polls `stop` (set by Ctrl-C or SIGTERM) and raises
    KeyboardInterrupt from here, never from inside a Ray call.
    """

    def __init__(self, cfg: DictConfig, stop: threading.Event):
        self.cfg, self.stop = cfg, stop
        self.world = cfg.parallel.pp * cfg.parallel.dp
        self.actors: list = []
        self.pg = None

    def _wait(self, refs: list, num_returns: int, timeout: Optional[float] = None) -> tuple[list, list]:
        """ray.wait in short slices, checking for an interrupt between them."""
        import ray

        deadline = None if timeout is None else time.monotonic() + timeout
        done: list = []
        while True:
            if self.stop.is_set():
                raise KeyboardInterrupt("interrupted")
            left = WAIT_POLL_S if deadline is None else min(WAIT_POLL_S, deadline - time.monotonic())
            ready, refs = ray.wait(refs, num_returns=min(num_returns - len(done), len(refs)),
                                   timeout=max(left, 0.0))
            done += ready
            if len(done) >= num_returns or (deadline is not None and time.monotonic() >= deadline):
                return done, refs

    def start(self) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cpus = self.cfg.launch.cpus_per_worker
        self.pg = placement_group([{"CPU": cpus}] * self.world, strategy="PACK")
        ready, _ = self._wait([self.pg.ready()], 1, timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            have = ray.cluster_resources().get("CPU", 0)
            raise WorkerFailed(f"cannot place {self.world} workers × {cpus} CPU: the Ray cluster "
                               f"has {have:g} CPUs (lower launch.cpus_per_worker or the layout)")
        actor_cls = ray.remote(num_cpus=cpus, max_restarts=0)(TrainWorker)
        self.actors = [
            actor_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=rank)).remote(rank)
            for rank in range(self.world)]

    def run(self, recipe: dict) -> list[dict]:
        import ray

        address_refs = [actor.address.remote() for actor in self.actors]
        self._wait(list(address_refs), len(address_refs))
        addresses = ray.get(address_refs)
        master_addr, master_port, _ = addresses[0]
        local = _local_ranks([node for _, _, node in addresses])
        refs = {}
        for rank, actor in enumerate(self.actors):
            env = {"RANK": str(rank), "WORLD_SIZE": str(self.world),
                   "LOCAL_RANK": str(local[rank][0]), "LOCAL_WORLD_SIZE": str(local[rank][1]),
                   "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)}
            refs[actor.run.remote(env, recipe)] = rank
        results: dict[int, dict] = {}
        pending = list(refs)
        while pending:
            done, pending = self._wait(pending, 1)
            self._collect(refs[done[0]], done[0], results)
        return [results[rank] for rank in range(self.world)]

    def _collect(self, rank: int, ref, results: dict[int, dict]) -> None:
        import ray

        try:
            results[rank] = ray.get(ref)
        except Exception as exc:  # a worker raised or died: end the whole group now
            self.shutdown()
            raise _worker_error(rank, exc) from None

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self.pg is not None:
            ray.util.remove_placement_group(self.pg)
            self.pg = None


@contextlib.contextmanager
def _signals_set(event: threading.Event):
    """SIGINT and SIGTERM set `event` instead of raising, while the group runs.

    A second signal raises at once: the user insists, even if a Ray call is cut short.
    """
    if threading.current_thread() is not threading.main_thread():
        yield event
        return

    def handler(signum, frame):
        if event.is_set():
            raise KeyboardInterrupt(f"signal {signum} again")
        event.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield event
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _worker_error(rank: int, exc: BaseException) -> BaseException:
    """Re-raise a user error (bad data, recipe) as itself; anything else names the rank."""
    from atoll.launch.cli import user_errors

    cause: Optional[BaseException] = getattr(exc, "cause", None)
    if isinstance(cause, user_errors()):
        return cause
    if cause is not None:
        return WorkerFailed(f"worker rank {rank} failed: {type(cause).__name__}: "
                            f"{' '.join(str(cause).split())[:500]}")
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return WorkerFailed(f"worker rank {rank} died: {first_line[:500]}")


def run_on_ray(cfg: DictConfig) -> list[dict[str, Any]]:
    """Run the recipe on a Ray worker group; returns each rank's final metrics."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # read at import; each rank's lines differ
    import ray

    from atoll.trainer.config import to_dict

    started = time.perf_counter()
    with _signals_set(threading.Event()) as stop:
        group = WorkerGroup(cfg, stop)
        try:
            _init_ray(cfg)
            group.start()
            results = group.run(to_dict(cfg))
            time.sleep(LOG_DRAIN_S)
            return results
        except WorkerFailed:
            time.sleep(LOG_DRAIN_S)
            raise
        finally:
            group.shutdown()
            ray.shutdown()
            print(f"ray worker group closed after {time.perf_counter() - started:.1f}s", flush=True)
