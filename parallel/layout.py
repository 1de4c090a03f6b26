"""The parallel layout: degrees, the process environment and the device mesh.

`Layout` is the single source of truth for how a run is split over processes
(world = islands × pp × dp, with ep borrowing ranks of dp). It builds the one
`DeviceMesh` of the run and hands out named sub-meshes; nothing else in atoll
creates process groups for training. It reads the rank from the environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, and LOCAL_DEVICE_ENV
where the launcher sets it) and so does not know whether Ray, torchrun or a
local spawner started the process.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import socket
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


MESH_DIMS = ("pp", "dp_mod_ep", "ep")
# "host:port/prefix" of a store the launcher keeps for the islands' outer groups. With it,
# each island also rendezvous on its own (MASTER_ADDR/MASTER_PORT are the island's), so
# an island can fail and come back while the others and the store live on.
OUTER_STORE_ENV = "ATOLL_OUTER_STORE"
# Set by a launcher that shows each process only GPUs of its own: the index, among the GPUs
# the process sees, of the one it trains on (see `visible_device_index`).
LOCAL_DEVICE_ENV = "ATOLL_LOCAL_DEVICE"


class LayoutError(ValueError):
    """The layout cannot run in this environment; one line naming the cause."""


@dataclass(frozen=True)
class ProcessEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    island: int = 0  # with DiLoCo islands, rank and world_size are those inside the island

    @classmethod
    def from_environ(cls) -> "ProcessEnv":
        def read(name: str, default: int) -> int:
            value = os.environ.get(name)
            try:
                return default if value is None else int(value)
            except ValueError:
                raise LayoutError(f"environment variable {name}={value!r} is not an integer") from None

        world = read("WORLD_SIZE", 1)
        return cls(rank=read("RANK", 0), world_size=world, local_rank=read("LOCAL_RANK", 0),
                   local_world_size=read("LOCAL_WORLD_SIZE", world))

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0 and self.island == 0

    @property
    def is_island_lead(self) -> bool:
        return self.rank == 0

    def in_island(self, island_world: int) -> "ProcessEnv":
        """The same process seen from inside its island of `island_world` ranks."""
        return ProcessEnv(rank=self.rank % island_world, world_size=island_world,
                          local_rank=self.local_rank, local_world_size=self.local_world_size,
                          island=self.rank // island_world)


def running_under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "TORCHELASTIC_RESTART_COUNT" in os.environ


@dataclass(frozen=True)
class Layout:
    pp: int = 1
    dp: int = 1
    ep: int = 1
    dp_shard: str = "fsdp"  # as the run uses it: fsdp or ddp (a recipe's auto is resolved)
    islands: int = 1
    dp_shard_why: str = field(default="", compare=False)  # how auto chose; "" when the recipe did

    @classmethod
    def from_recipe(cls, cfg, device: Optional[torch.device] = None,
                    local_ranks: Optional[int] = None) -> "Layout":
        """The recipe's layout, with `parallel.dp_shard: auto` resolved (memory_plan's
        choose_dp_shard) against the memory of one rank: `launch.device_memory_gb`, else that
        of `device` if it is a GPU (default: this machine's first GPU, if any), else this
        machine's memory shared by `local_ranks` processes (default: the whole world)."""
        from atoll.parallel.memory_plan import GIB, choose_dp_shard, rank_memory_bytes

        par = cfg.parallel
        layout = cls(pp=par.pp, dp=par.dp, ep=par.ep, dp_shard=par.dp_shard, islands=cfg.diloco.islands)
        if par.dp_shard != "auto":
            return layout
        if device is None and torch.cuda.is_available():
            device = torch.device("cuda", 0)
        gpu_gb = (torch.cuda.get_device_properties(device).total_memory / GIB
                  if device is not None and device.type == "cuda" else None)
        choice = choose_dp_shard(cfg, *rank_memory_bytes(cfg, gpu_gb, local_ranks or layout.world_size))
        return replace(layout, dp_shard=choice.mode, dp_shard_why=choice.why)

    @property
    def island_world(self) -> int:
        return self.pp * self.dp

    @property
    def world_size(self) -> int:
        return self.islands * self.island_world

    def describe(self) -> str:
        islands = f"{self.islands} islands × " if self.islands > 1 else ""
        why = f" ({self.dp_shard_why})" if self.dp_shard_why else ""
        return (f"world={self.world_size} ({islands}pp={self.pp} × dp={self.dp}, ep={self.ep}), "
                f"dp_shard={self.dp_shard}{why}")

    def to_dict(self) -> dict:
        out = {"pp": self.pp, "dp": self.dp, "ep": self.ep, "dp_shard": self.dp_shard,
               "world_size": self.world_size}
        if self.islands > 1:
            out["islands"] = self.islands
        return out

    def check_world(self, env: ProcessEnv) -> None:
        if env.world_size != self.world_size:
            islands = f"diloco.islands={self.islands} × " if self.islands > 1 else ""
            raise LayoutError(
                f"WORLD_SIZE={env.world_size} but the recipe's layout needs {self.world_size} "
                f"processes ({islands}parallel.pp={self.pp} × parallel.dp={self.dp})")


def agree_dp_shard(layout: Layout, store: dist.Store) -> Layout:
    """The first rank's resolution of `parallel.dp_shard: auto`, for every rank of the run.

    Ranks on machines with less memory could resolve it otherwise, and a restarted DiLoCo
    island must shard like its peers (the run's store outlives it), so the first choice
    written to the store holds; the key names the degrees, so that a resized layout
    chooses anew.
    """
    key = f"atoll/dp_shard/pp{layout.pp}-dp{layout.dp}-ep{layout.ep}"
    mine = json.dumps([layout.dp_shard, layout.dp_shard_why])
    mode, why = json.loads(store.compare_set(key, "", mine).decode())
    return replace(layout, dp_shard=mode, dp_shard_why=why)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rendezvous_store(env: ProcessEnv, timeout: datetime.timedelta) -> dist.TCPStore:
    """The run's key-value store, listening on MASTER_ADDR only.

    torch's TCPStore binds its server to every interface; handed a socket
    that is already bound, it listens where that socket does. On loopback
    gloo is kept there too.
    """
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if is_loopback(addr):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if env.rank != 0:
        return dist.TCPStore(addr, port, env.world_size, False, timeout=timeout)
    return serve_store(addr, port, timeout, env.world_size)


def serve_store(addr: str, port: int, timeout: datetime.timedelta,
                world_size: Optional[int] = None) -> dist.TCPStore:
    """A TCPStore server listening on `addr` only (port 0: a free one, see `.port`)."""
    sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((addr, port))
    sock.listen(1024)
    port = sock.getsockname()[1]
    return dist.TCPStore(addr, port, world_size, True, timeout=timeout, wait_for_workers=False,
                         master_listen_fd=sock.detach())


def connect_outer_store(address: str, timeout: datetime.timedelta) -> dist.Store:
    """The launcher's store for the islands, from `host:port/prefix`."""
    location, _, prefix = address.partition("/")
    host, port = location.rsplit(":", 1)
    store = dist.TCPStore(host, int(port), is_master=False, timeout=timeout)
    return dist.PrefixStore(prefix, store) if prefix else store


def torchrun_store(env: ProcessEnv, timeout: datetime.timedelta) -> dist.Store:
    """torchrun's store, with a prefix per restart: the keys of a failed attempt (its ranks'
    addresses) must not be read by the next one."""
    store, _, _ = next(dist.rendezvous("env://", rank=env.rank, world_size=env.world_size,
                                       timeout=timeout))
    prefix = f"atoll/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return dist.PrefixStore(prefix, store)


def is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return addr == "localhost"


def visible_device_index(env: ProcessEnv, visible: int) -> int:
    """Which of the `visible` GPUs this process sees it trains on.

    torchrun and the local spawner leave every GPU of the node visible to
    every process: LOCAL_RANK picks one. A launcher that gives each process
    GPUs of its own (Ray with launch.gpus_per_worker ≥ 1) shows it only those,
    renumbered from 0, while LOCAL_RANK still counts the processes on the
    node: it names the index to use in LOCAL_DEVICE_ENV. A process shown one
    GPU by someone else (srun --gpus-per-task=1 sets CUDA_VISIBLE_DEVICES per
    task) uses that one. Otherwise a LOCAL_RANK past the visible GPUs means
    two ranks on one GPU, which NCCL refuses: that is a one-line error here,
    not a wrap-around.
    """
    named = os.environ.get(LOCAL_DEVICE_ENV)
    if named and not named.isdigit():
        raise LayoutError(f"environment variable {LOCAL_DEVICE_ENV}={named!r} is not a GPU index")
    index = int(named) if named else env.local_rank
    if index < visible:
        return index
    if visible == 1 and os.environ.get("CUDA_VISIBLE_DEVICES"):
        return 0
    chosen = f"{LOCAL_DEVICE_ENV}={named}" if named else f"LOCAL_RANK={env.local_rank}"
    raise LayoutError(f"{chosen} but this process sees {visible} GPU(s): two ranks would share a "
                      f"GPU; start at most {visible} processes on this node")


def device_for(env: ProcessEnv) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", visible_device_index(env, torch.cuda.device_count()))
    return torch.device("cpu")


_OWN_PORTS: set[str] = set()  # the MASTER_PORTs worlds of one in this process chose


def _own_port_for_a_world_of_one() -> None:
    """A free port for a one-rank group's store, unless the user named one. A port chosen
    for an earlier run in this process (still set, or set again by code that saved and
    restored the environment) is not reused: it was free then, and any socket (an outgoing
    connection's ephemeral port) may hold it now."""
    port = os.environ.get("MASTER_PORT")
    if port is None or port in _OWN_PORTS:
        port = os.environ["MASTER_PORT"] = str(free_port())
        _OWN_PORTS.add(port)


class ParallelMesh:
    """The run's process group and device mesh; one per process.

    With a world of one there is no mesh and no parallel wrapper, so
    single-process runs are plain PyTorch (the reference every layout is
    compared against).
    """

    def __init__(self, layout: Layout, env: ProcessEnv, device: torch.device,
                 timeout_s: float = 600.0):
        self.layout = layout
        layout.check_world(env)
        # The process group is the island's: DiLoCo islands talk only through their outer groups.
        self.env = env = env.in_island(layout.island_world)
        self.device = device
        self.mesh: Optional[DeviceMesh] = None
        self.store: Optional[dist.Store] = None  # the run's store, under every island's prefix
        self._flattened: dict[str, DeviceMesh] = {}
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            # Even a world of one gets a (gloo) process group: checkpoint saves
            # plan through it. Training itself uses none.
            if layout.world_size == 1:
                os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                _own_port_for_a_world_of_one()
            backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
            timeout = datetime.timedelta(seconds=timeout_s)
            whole = ProcessEnv(rank=env.island * layout.island_world + env.rank,
                               world_size=layout.world_size)
            outer = os.environ.get(OUTER_STORE_ENV) if layout.islands > 1 else None
            if outer:
                self.store = connect_outer_store(outer, timeout)
                store = rendezvous_store(env, timeout)
            else:
                store = torchrun_store(whole, timeout) if running_under_torchrun() else \
                    rendezvous_store(whole, timeout)
                self.store = store
            if layout.islands > 1 and not outer:
                store = dist.PrefixStore(f"island-{env.island}", store)
            # device_id binds the NCCL communicator to this rank's GPU at once (and lets
            # sub-groups split from it) instead of guessing the device at the first collective.
            bound = {"device_id": device} if device.type == "cuda" else {}
            dist.init_process_group(backend=backend, store=store, rank=env.rank,
                                    world_size=env.world_size, timeout=timeout, **bound)
        if layout.dp_shard_why and self.store is not None:
            self.layout = agree_dp_shard(layout, self.store)
        if env.world_size == 1:
            return
        shape = (layout.pp, layout.dp // layout.ep, layout.ep)
        self.mesh = init_device_mesh(device.type, shape, mesh_dim_names=MESH_DIMS)
        # Flattened dims are kept here: slicing them from the root mesh is deprecated.
        self._flattened["dp"] = self.mesh["dp_mod_ep", "ep"]._flatten("dp")

    def __getitem__(self, name: str) -> DeviceMesh:
        if self.mesh is None:
            raise LayoutError("a single-process run has no device mesh")
        return self._flattened[name] if name in self._flattened else self.mesh[name]

    @property
    def dp_rank(self) -> int:
        return 0 if self.mesh is None else self["dp"].get_local_rank()

    @property
    def dp_group(self) -> Optional[dist.ProcessGroup]:
        return None if self.mesh is None else self["dp"].get_group()

    @property
    def pp_rank(self) -> int:
        return 0 if self.mesh is None else self.mesh["pp"].get_local_rank()

    @property
    def pp_group(self) -> Optional[dist.ProcessGroup]:
        return None if self.mesh is None else self.mesh["pp"].get_group()

    @property
    def stage_world_size(self) -> int:
        """Ranks that hold (a shard or a copy of) the same pipeline stage: dp."""
        return self.layout.dp

    def sum_over_stages(self, values: list[float]) -> list[float]:
        """Sum a few scalars over the pipeline stages (each stage knows its own part)."""
        if self.mesh is None or self.layout.pp == 1:
            return list(values)
        buf = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(buf, group=self.pp_group)
        return buf.tolist()

    def barrier(self) -> None:
        if self.mesh is not None:
            dist.barrier()

    def broadcast_object(self, obj):
        """Rank 0's value of a small picklable object, on every rank."""
        if self.mesh is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_of(self, flag: bool) -> bool:
        """True when `flag` is true on every rank of the process group (this island)."""
        if self.mesh is None:
            return flag
        buf = torch.tensor([0 if flag else 1], dtype=torch.int32)  # CPU: gloo under either backend
        dist.all_reduce(buf)
        return int(buf) == 0

    def gather_objects(self, obj) -> list:
        """Every rank's small picklable object, in rank order."""
        if self.mesh is None:
            return [obj]
        out = [None] * self.env.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_reduce_mean(self, values: list[float]) -> list[float]:
        """Mean over the data-parallel group of a few scalars (for logging)."""
        if self.mesh is None or self.layout.dp == 1:
            return list(values)
        buf = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(buf, group=self.dp_group)
        return (buf / self.layout.dp).tolist()

    def close(self, clean: bool = True) -> None:
        """Release the process groups. `clean`: every rank finished its last collective.

        Otherwise a peer may be dead or stuck inside a collective, and destroying an NCCL
        communicator waits for its pending work, i.e. for that peer, forever: abort it
        instead. gloo's destroy waits for no peer, so gloo groups are destroyed as always.
        """
        if not dist.is_initialized():
            return
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if clean or abort is None or "nccl" not in str(dist.get_backend()):
            dist.destroy_process_group()
            return
        try:
            abort()  # every group of this process, the mesh's sub-groups included
        except Exception as exc:  # e.g. NCCL's watchdog aborted it already; a destroy could hang
            print(f"warning: aborting the process group failed: {exc}", flush=True)
