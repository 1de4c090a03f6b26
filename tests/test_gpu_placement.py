"""Placement on GPUs, checked without one: a real Ray cluster that declares logical GPUs.

Ray hands out GPUs it only counts (`ray.init(num_gpus=2)`) exactly as it
hands out real ones: bundles reserve them, an actor that asks for one gets
an id and a CUDA_VISIBLE_DEVICES naming only that id. So the real
`RayWorkerGroup` and `ActorPool` run here as on a GPU node, short of the
devices. Ray runs in a process of its own, with the environment variable
that keeps it on loopback set before it is imported, like the run's driver.

Also here: which visible GPU a process trains on (`visible_device_index`),
and closing the process group after a peer died (the error path).
"""

from __future__ import annotations

import os
import time
import traceback

import pytest

from atoll.parallel.layout import LOCAL_DEVICE_ENV, LayoutError, ProcessEnv, visible_device_index


def _placement_on_logical_gpus(session_id: str, results) -> None:
    """Groups with and without GPUs on a 2-CPU, 2-GPU local Ray cluster; what each rank saw."""
    try:
        from conftest import MARKER

        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported
        os.environ[MARKER] = session_id  # Ray's processes are checked for at the session's end
        import ray
        from omegaconf import OmegaConf
        from ray.util.placement_group import placement_group_table

        from atoll.launch.ray_backend import gpus_per_worker
        from atoll.launch.worker_group import ActorPool, PlacementTimeout, RayWorkerGroup

        ray.init(num_cpus=2, num_gpus=2, object_store_memory=80 * 1024 * 1024,
                 _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
                 logging_level="WARNING")
        out: dict = {}
        try:
            out["default_gpus"] = gpus_per_worker(OmegaConf.create({"launch": {"gpus_per_worker": None}}))

            said: list[str] = []
            pool = ActorPool(1, log=said.append)
            started = time.perf_counter()
            try:
                RayWorkerGroup(1, 3, 60, pool, gpus_per_worker=1, cluster_fixed=True).create()
            except PlacementTimeout as exc:
                out["too_many"] = (str(exc), time.perf_counter() - started)

            group = RayWorkerGroup(1, 2, 60, pool, gpus_per_worker=1, cluster_fixed=True)
            group.create()
            out["gpu"] = {"bundles": list(placement_group_table(group.pg)["bundles"].values()),
                          "infos": group._infos, "ranks": group.ranks, "spares": len(pool.spares)}
            group.shutdown()
            out["said"] = said

            cpu_pool = ActorPool()  # gpus_per_worker=0: today's path, warm spares included
            group = RayWorkerGroup(1, 1, 60, cpu_pool)
            group.create()
            out["cpu"] = {"bundles": list(placement_group_table(group.pg)["bundles"].values()),
                          "infos": group._infos, "spares": len(cpu_pool.spares)}
            group.shutdown()
            out["warming"] = [cpu_pool.warming()]  # the spare started at the shutdown imports now
            ray.get(cpu_pool.spares[0][1].warm_up.remote())  # answers once its own warm-up ended
            out["warming"].append(cpu_pool.warming())
            cpu_pool.close()
        finally:
            ray.shutdown()
        results.put(out)
    except Exception:
        results.put(traceback.format_exc())


@pytest.mark.slow
def test_ray_ranks_get_a_gpu_of_their_own():
    """With GPUs, each rank's bundle holds one GPU and each rank sees only its own (distinct ids,
    CUDA_VISIBLE_DEVICES naming just that one); no warm spares, said once; a world the cluster's
    GPUs can never hold fails at once in one line. Without GPUs, bundles hold CPUs only, ranks
    see no GPU, and spares warm up as before, saying so while they do."""
    from conftest import RESULT_TIMEOUT_S, SESSION_ID, spawned

    with spawned() as (start, results):
        start(_placement_on_logical_gpus, SESSION_ID)
        got = results.get(timeout=RESULT_TIMEOUT_S)
    assert not isinstance(got, str), got

    assert got["default_gpus"] == 1  # launch.gpus_per_worker unset on a cluster with GPUs

    message, took = got["too_many"]
    assert message == "cannot place 3 workers × 1 GPU: the Ray cluster has 2 GPUs (launch.gpus_per_worker=1)"
    assert took < 10  # at once, not after the placement timeout

    gpu = got["gpu"]
    assert gpu["bundles"] == [{"CPU": 1.0, "GPU": 1.0}] * 2
    ids = [info["gpus"] for info in gpu["infos"]]
    assert sorted(ids) == [["0"], ["1"]]
    assert [info["visible_devices"] for info in gpu["infos"]] == [i[0] for i in ids]
    assert [rank.gpus for rank in gpu["ranks"]] == [tuple(i) for i in ids]
    assert gpu["spares"] == 0
    assert len(got["said"]) == 1 and "no warm spare actors" in got["said"][0]

    cpu = got["cpu"]
    assert cpu["bundles"] == [{"CPU": 1.0}]
    assert [info["gpus"] for info in cpu["infos"]] == [[]]
    assert cpu["spares"] == 1
    assert got["warming"] == [True, False]  # what the supervisor holds straggler scores on


@pytest.mark.parametrize("local_rank, visible, environ, want", [
    (1, 8, {}, 1),  # torchrun, local: every GPU visible, LOCAL_RANK picks
    (3, 1, {LOCAL_DEVICE_ENV: "0", "CUDA_VISIBLE_DEVICES": "3"}, 0),  # Ray, one GPU per rank
    (3, 2, {LOCAL_DEVICE_ENV: "0", "CUDA_VISIBLE_DEVICES": "6,7"}, 0),  # Ray, two GPUs per rank
    (2, 1, {"CUDA_VISIBLE_DEVICES": "2"}, 0),  # srun --gpus-per-task=1
    (2, 2, {}, None),  # three processes on two GPUs: two would share one
])
def test_each_process_trains_on_a_gpu_it_sees(monkeypatch, local_rank, visible, environ, want):
    for name in (LOCAL_DEVICE_ENV, "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    env = ProcessEnv(rank=local_rank, world_size=8, local_rank=local_rank, local_world_size=8)
    if want is None:
        with pytest.raises(LayoutError, match="LOCAL_RANK=2 but this process sees 2 GPU"):
            visible_device_index(env, visible)
    else:
        assert visible_device_index(env, visible) == want


def _close_after_peer_died(rank: int, port: int, flag: str, results) -> None:
    """Rank 1 leaves without a word; rank 0's collective fails and it closes on the error path."""
    try:
        import torch
        import torch.distributed as dist

        from atoll.parallel.layout import Layout, ParallelMesh

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        mesh = ParallelMesh(Layout(dp=2), ProcessEnv(rank=rank, world_size=2), torch.device("cpu"),
                            timeout_s=30)
        mesh.barrier()
        if rank == 1:
            os._exit(0)  # a crash: no goodbye, no destroy
        while not os.path.exists(flag):  # the parent saw rank 1's process end
            time.sleep(0.05)
        try:
            dist.all_reduce(torch.ones(1))
            failed = False
        except Exception:
            failed = True
        started = time.perf_counter()
        mesh.close(clean=False)
        results.put((rank, {"collective_failed": failed, "close_s": time.perf_counter() - started,
                            "initialized": dist.is_initialized()}))
    except Exception:
        results.put((rank, traceback.format_exc()))


@pytest.mark.slow
def test_closing_after_a_peer_died_returns(tmp_path):
    """The error path (`close(clean=False)`) after a peer died returns at once and leaves no
    process group (gloo: destroyed as before; NCCL would be aborted)."""
    from conftest import RESULT_TIMEOUT_S, free_port, spawned

    flag, port = tmp_path / "peer-gone", free_port()
    with spawned() as (start, results):
        procs = [start(_close_after_peer_died, rank, port, str(flag)) for rank in range(2)]
        procs[1].join(timeout=RESULT_TIMEOUT_S)
        assert procs[1].exitcode == 0, "rank 1 did not get past the rendezvous"
        flag.touch()
        rank, got = results.get(timeout=RESULT_TIMEOUT_S)
    assert rank == 0 and not isinstance(got, str), got
    assert got["collective_failed"] and not got["initialized"]
    assert got["close_s"] < 10
