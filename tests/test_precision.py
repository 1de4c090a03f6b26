"""`model.dtype=bf16` takes one precision on every path, with an fp32 router and fp32 state.

On CPU (torch runs bf16 autocast and bf16 parameters there) the default
recipe's MoE model trains whole steps on one process, under FSDP2 and DDP
(dp=2), expert parallelism (dp=2, ep=2), a pipeline (pp=2) and DiLoCo
(2 islands), each with the same global batch. Every path must compute its
matmuls in bf16 (FSDP by all-gathering bf16 parameters, the others under
autocast), score the router in fp32 with an fp32 gate weight, keep the
parameters and the optimizer state fp32, and land within what bf16 rounding
explains of the fp32 run's losses and gradient norm.
"""

from __future__ import annotations

import math
import os
import traceback

import pytest
import torch

from atoll.trainer.moe import Router

STEPS = 2
# The default recipe's model (dim 128, 4 layers, 8 experts, top-2) on short windows;
# every layout's global batch is 8 windows, so step 1 sees the same samples everywhere.
BASE = ["model.dtype=bf16", f"run.steps={STEPS}", "data.seq_len=32", "data.micro_batch=4",
        "data.max_bytes=400000", "logging.log_interval=1", "logging.eval_interval=0",
        "logging.wandb=disabled", "checkpoint.interval=0", "checkpoint.memory_interval=0",
        "launch.threads_per_worker=1", "fault_tolerance.collective_timeout_s=60"]
ONE_RANK = ["parallel.dp=1", "data.grad_accum=2"]
SINGLE = {"single-fp32": [*ONE_RANK, "model.dtype=fp32"], "single": ONE_RANK}
# (name, overrides, FSDP casts the parameters): each runs on two spawned ranks, one after another.
PATHS = [
    ("fsdp", ["parallel.dp=2", "parallel.dp_shard=fsdp"], True),
    ("ddp", ["parallel.dp=2", "parallel.dp_shard=ddp"], False),
    # FSDP leaves these experts alone (dp = ep): the naive kernel's matmuls need autocast.
    ("ep", ["parallel.dp=2", "parallel.ep=2", "parallel.dp_shard=fsdp", "model.moe.kernel=naive"], True),
    ("pp", ["parallel.pp=2", *ONE_RANK], False),
    ("diloco", ["diloco.islands=2", "diloco.inner_steps=2", *ONE_RANK], False),
]


def test_router_scores_in_fp32_under_bf16_autocast():
    """Under bf16 autocast the router returns bitwise what it returns in fp32: its matmul
    and softmax/sigmoid really run in fp32."""
    torch.manual_seed(0)
    x_TD = torch.randn(64, 32)
    for score_func in ("softmax", "sigmoid"):
        router = Router(32, 8, 2, score_func=score_func)
        want = router(x_TD)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = router(x_TD)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and torch.equal(g, w), score_func


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _train_recording_dtypes(overrides: list[str], run_dir: str) -> dict:
    """Train STEPS steps with a Trainer built like the launcher's; the dtypes seen on the way."""
    from atoll.parallel.expert_parallel import moe_layers
    from atoll.trainer.config import load_recipe
    from atoll.trainer.train import Trainer

    seen: dict[str, set] = {key: set() for key in
                            ("router_out", "gate_weight", "matmul_out", "matmul_weight")}

    def add(key: str, *tensors: torch.Tensor) -> None:  # None: the hooks change nothing
        for tensor in tensors:
            if not tensor.is_meta:  # a pipeline's shape inference may run on meta tensors
                seen[key].add(str(tensor.dtype))

    trainer = Trainer(load_recipe(None, [*BASE, *overrides, f"run.dir={run_dir}"]))
    try:
        for part in trainer.parts:
            for _, moe in moe_layers(part):
                # Registered after FSDP's hooks: the pre-hook sees the gathered gate weight.
                moe.router.register_forward_pre_hook(lambda m, args: add("gate_weight", m.gate.weight))
                moe.router.register_forward_hook(lambda m, args, out: add("router_out", out[0], out[2]))
            if "0" in part.layers:  # the first block's first matmul
                wq = part.layers["0"].attention.wq
                wq.register_forward_hook(lambda m, args, out: add("matmul_out", out) or
                                         add("matmul_weight", m.weight))
        trainer.run()
        seen["params"] = {str(_local(p).dtype) for part in trainer.parts for p in part.parameters()}
        seen["optimizer_state"] = {str(_local(v).dtype) for opt in trainer.optimizers
                                   for state in opt.state.values() for v in state.values()
                                   if torch.is_tensor(v)}
    finally:
        trainer.close()
    return seen


def _rank(rank: int, ports, tmp: str, results) -> None:
    """One of two ranks: rank 0 first trains the one-process runs alone, then both ranks
    train every path of PATHS, each on a rendezvous port rank 0 picks just before (and
    sends through `ports`): ports picked early may meanwhile serve a connection's local end."""
    from conftest import free_port

    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo", LOCAL_RANK=str(rank))
        out = {}
        if rank == 0:
            for name, overrides in SINGLE.items():
                os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_PORT=str(free_port()))
                out[name] = _train_recording_dtypes(overrides, f"{tmp}/{name}")
        for name, overrides, _ in PATHS:
            if rank == 0:
                port = free_port()
                ports.put(port)
            else:
                port = ports.get(timeout=300)
            os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_PORT=str(port))
            out[name] = _train_recording_dtypes(overrides, f"{tmp}/{name}")
        results.put((rank, out))
    except Exception:
        results.put((rank, traceback.format_exc()))


@pytest.mark.slow
def test_every_path_trains_in_one_precision(tmp_path):
    import torch.multiprocessing as mp

    from conftest import RESULT_TIMEOUT_S, grad_norms, losses, spawned

    ports = mp.get_context("spawn").Queue()
    with spawned() as (start, results):
        for rank in range(2):
            start(_rank, rank, ports, str(tmp_path))
        got = dict(results.get(timeout=2 * RESULT_TIMEOUT_S) for _ in range(2))
    for rank, value in got.items():
        assert not isinstance(value, str), f"rank {rank}:\n{value}"

    reference, reference_norms = losses(tmp_path / "single-fp32"), grad_norms(tmp_path / "single-fp32")
    assert len(reference) == STEPS and got[0]["single-fp32"]["matmul_out"] == {"torch.float32"}
    fp32_only = {"torch.float32"}
    for name, fsdp in [("single", False)] + [(name, fsdp) for name, _, fsdp in PATHS]:
        for rank in ([0] if name == "single" else [0, 1]):
            seen = got[rank][name]
            where = f"{name} rank {rank}"
            assert seen["router_out"] == fp32_only and seen["gate_weight"] == fp32_only, where
            assert seen["params"] == fp32_only and seen["optimizer_state"] == fp32_only, where
            if seen["matmul_out"] or rank == 0:  # pp: only rank 0 holds the first block
                assert seen["matmul_out"] == {"torch.bfloat16"}, where
                # FSDP all-gathers bf16 parameters; the others keep fp32 ones and autocast.
                assert seen["matmul_weight"] == {"torch.bfloat16" if fsdp else "torch.float32"}, where
        run_losses, run_norms = losses(tmp_path / name), grad_norms(tmp_path / name)
        assert len(run_losses) == STEPS and all(math.isfinite(loss) for loss in run_losses), name
        # At initialisation the loss is close to log(vocab) whatever the precision; the
        # gradient norm and the loss after an update show bf16's rounding (~1e-3 here).
        # A DiLoCo island's second batch is not the one-process run's: step 1 only.
        compared = 1 if name == "diloco" else STEPS
        assert run_losses[:compared] == pytest.approx(reference[:compared], rel=2e-3), name
        assert run_norms[0] == pytest.approx(reference_norms[0], rel=1e-2), name
        assert run_norms[0] != reference_norms[0], name  # not silently fp32
