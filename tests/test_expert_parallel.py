"""Expert parallelism: same model, same numbers, checkpoints that cross ep degrees.

The single-process run is the reference. ep=2 runs (real torchrun, gloo
all-to-all) with FSDP and with DDP must follow its loss trajectory, and
checkpoints saved at ep=2 resume at ep=1 and vice versa, optimizer state
included.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from atoll.checkpoint.manifest import verify
from atoll.checkpoint.store import resolve_checkpoint
from atoll.launch.cli import main
from atoll.trainer.config import MoEConfig
from atoll.trainer.metrics import read_jsonl
from atoll.trainer.moe import MoE, Router, apply_capacity
from conftest import TINY_MOE, assert_close_state, assert_same_metrics, run_cli

STEPS = 6


@pytest.mark.slow
def test_ep2_matches_ep1_and_checkpoints_cross_ep_degrees(tmp_path):
    common = [*TINY_MOE, f"run.steps={STEPS}", "checkpoint.interval=3"]
    reference = tmp_path / "reference"
    assert main(["train", *common, "launch.backend=local", "parallel.dp=1", "data.grad_accum=2",
                 f"run.dir={reference}"]) == 0

    # ep=2 with FSDP: the whole run, saving at step 3 with experts split over 2 ranks.
    ep_fsdp = tmp_path / "ep2_fsdp"
    proc = run_cli(["train", *common, "parallel.dp=2", "parallel.ep=2", f"run.dir={ep_fsdp}"],
                   torchrun_procs=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_metrics(ep_fsdp, reference)  # loss and gradient norm
    saved = ep_fsdp / "checkpoints" / "step-00000003"
    manifest = verify(saved)
    assert manifest["layout"]["ep"] == 2
    assert manifest["tensors"]["model.layers.0.feed_forward.experts.w1"]["shape"][0] == 4  # global E
    assert manifest["tensors"]["optim.state.layers.0.feed_forward.experts.w1.exp_avg"]["shape"][0] == 4

    # ep=2 -> ep=1: one process continues from the ep=2 checkpoint.
    to_ep1 = tmp_path / "to_ep1"
    assert main(["train", *common, "launch.backend=local", "parallel.dp=1", "data.grad_accum=2",
                 f"checkpoint.resume={saved}", f"run.dir={to_ep1}"]) == 0
    assert_same_metrics(to_ep1, reference, first_step=4)
    # Weights and both Adam moments: Adam's steps amplify the float drift of the ep=2 steps
    # before the checkpoint (weights ~2e-6 off their scale at the end), hence 1e-5.
    assert_close_state(to_ep1, reference, tol=1e-5)

    # ep=1 -> ep=2 with DDP: the reference's own step-3 checkpoint, experts split on load.
    to_ep2 = tmp_path / "to_ep2_ddp"
    proc = run_cli(["train", *common, "parallel.dp=2", "parallel.ep=2", "parallel.dp_shard=ddp",
                    f"checkpoint.resume={resolve_checkpoint(reference / 'checkpoints' / 'step-00000003')}",
                    f"run.dir={to_ep2}"], torchrun_procs=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_metrics(to_ep2, reference, first_step=4)
    assert_close_state(to_ep2, reference, tol=1e-5)
    # Load statistics reach the metrics, summed over both ranks' tokens.
    last = read_jsonl(to_ep2 / "metrics.jsonl")[-1]
    assert last["moe.0.mean_load"] == 2 * 2 * 32 * 2 / 4  # dp × micro_batch × seq_len × top_k / E
    assert last["moe.0.max_load"] >= last["moe.0.mean_load"] and last["moe.0.dropped"] == 0


def test_group_limited_routing_picks_equally_from_every_group():
    torch.manual_seed(0)
    router = Router(16, 8, 4, groups=2)
    _, experts_TK, _, _ = router(torch.randn(50, 16))
    per_group = (experts_TK // 4)  # experts 0-3 are group 0, 4-7 group 1
    assert torch.equal((per_group == 0).sum(-1), torch.full((50,), 2))
    assert torch.equal((per_group == 1).sum(-1), torch.full((50,), 2))


def test_aux_free_bias_steers_selection_not_gates():
    torch.manual_seed(0)
    router = Router(8, 4, 1, renormalize=False)
    x = torch.randn(200, 8)
    gates_before, experts_before, probs, _ = router(x)
    load = torch.bincount(experts_before.flatten(), minlength=4)
    for _ in range(200):
        router.update_bias(torch.bincount(router(x)[1].flatten(), minlength=4), rate=1e-2)
    gates, experts, _, _ = router(x)
    balanced = torch.bincount(experts.flatten(), minlength=4)
    assert balanced.max() - balanced.min() < load.max() - load.min()
    # Gates are the unbiased probabilities of whichever experts were selected.
    torch.testing.assert_close(gates, probs.gather(1, experts))
    assert "expert_bias_E" in router.state_dict()


def test_sigmoid_scores_and_capacity_accounting():
    torch.manual_seed(0)
    moe = MoE(8, 12, MoEConfig(num_experts=4, top_k=2, score_func="sigmoid", capacity_factor=0.5,
                               balance="none"))
    x = torch.randn(2, 10, 8)
    out, _, _ = moe(x)
    gates, experts, probs, _ = moe.router(x.reshape(-1, 8))
    torch.testing.assert_close(probs, torch.sigmoid(F.linear(x.reshape(-1, 8), moe.router.gate.weight)))
    kept = apply_capacity(experts, 4, 0.5)
    capacity = 5  # ceil(0.5 · 20 tokens · 2 slots / 4 experts)
    for e in range(4):
        assert (experts[kept] == e).sum() <= capacity
    load, dropped = moe.take_load()
    assert load.sum() + dropped == 20 * 2 and dropped == (~kept).sum() > 0
    # A dropped assignment contributes nothing: equal to the kernel with its gate zeroed.
    expected = moe.experts(x.reshape(-1, 8), gates * kept, experts).reshape(2, 10, 8)
    torch.testing.assert_close(out, expected)


# ------------------------------------------------------------ dispatch to one rank

def _kernels_on_cpu() -> list[str]:
    from atoll.parallel.kernels import grouped_mm_usable, triton_usable

    cpu = torch.device("cpu")
    return ["naive", "sorted"] + (["grouped_mm"] if grouped_mm_usable(cpu, torch.float32) else []) + \
        (["triton"] if triton_usable(cpu) else [])


ONE_RANK_TOKENS, ONE_RANK_DIM, ONE_RANK_HIDDEN = 12, 8, 12
# Selection bias that sends every token's top-2 to the experts of one ep rank (2 experts each).
TO_RANK = {0: [10.0, 10.0, 0.0, 0.0], 1: [0.0, 0.0, 10.0, 10.0]}


# Zero-computation experts next to the 4 FFN ones (ids 4-7: zero, copy, 2 constant), with a
# bias that sends some tokens only to them: their assignments stay on the rank.
ZERO_COMPUTE = dict(zero_experts=1, copy_experts=1, constant_experts=2, renormalize=False)
ZERO_COMPUTE_BIAS = [0.0, 0.0, 0.0, 0.0, 0.05, 0.05, 0.05, 0.05]


def _one_rank_moe(kernel: str, **keys) -> MoE:
    torch.manual_seed(0)
    moe = MoE(ONE_RANK_DIM, ONE_RANK_HIDDEN, MoEConfig(num_experts=4, top_k=2, kernel=kernel, balance="none",
                                                       **keys))
    with torch.no_grad():
        for w in (moe.experts.w1, moe.experts.w3, moe.experts.w2):
            w.normal_(std=0.3)
    return moe


def _rank_tokens(rank: int) -> torch.Tensor:
    return torch.randn(1, ONE_RANK_TOKENS, ONE_RANK_DIM, generator=torch.Generator().manual_seed(10 + rank))


def _forward_backward(moe: MoE, x: torch.Tensor, target: int) -> dict:
    """Output, input and router gradients, and the experts' gradients (whole [E, ...])."""
    from torch.distributed.tensor import DTensor

    moe.router.expert_bias_E.copy_(torch.tensor(ZERO_COMPUTE_BIAS if target == "zero" else TO_RANK[target]))
    moe.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out, _, _ = moe(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    whole = lambda g: g.full_tensor() if isinstance(g, DTensor) else g
    extra = {} if moe.zero_compute is None else \
        {name: p.grad for name, p in moe.zero_compute.named_parameters()}
    return {"out": out.detach(), "x": x.grad, "router": moe.router.gate.weight.grad, **extra,
            **{name: whole(getattr(moe.experts, name).grad) for name in ("w1", "w3", "w2")}}


def _dispatch_rank(rank: int, store_file: str, results) -> None:
    """One of two ep ranks: for every kernel, all tokens of both ranks go to rank 0's experts,
    then all to rank 1's (the other rank receives and computes nothing, forward or backward)."""
    import datetime
    import os
    import traceback

    import torch.distributed as dist

    from atoll.parallel.expert_parallel import apply_expert_parallel
    from atoll.parallel.layout import Layout, ParallelMesh, ProcessEnv

    try:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=60))  # a rank left waiting fails
        mesh = ParallelMesh(Layout(dp=2, ep=2), ProcessEnv(rank=rank, world_size=2), torch.device("cpu"))
        out = {}
        for kernel in _kernels_on_cpu():
            moe = _one_rank_moe(kernel)
            apply_expert_parallel(moe, mesh)
            for target in TO_RANK:
                got = _forward_backward(moe, _rank_tokens(rank), target)
                missing = [k for k, v in got.items() if v is None]
                assert not missing, f"{kernel}, all tokens to rank {target}: no gradient for {missing}"
                out[kernel, target] = {k: v.numpy().copy() for k, v in got.items()}
            moe = _one_rank_moe(kernel, **ZERO_COMPUTE)
            apply_expert_parallel(moe, mesh)
            got = {k: v.numpy().copy() for k, v in _forward_backward(moe, _rank_tokens(rank), "zero").items()}
            out[kernel, "zero"] = {**got, "sent_bytes": moe.experts.sent_bytes}
        results.put((rank, out))
        dist.destroy_process_group()
    except Exception:
        results.put((rank, traceback.format_exc()))


@pytest.mark.slow
def test_every_token_routed_to_one_ep_rank_matches_one_process(tmp_path):
    """ep=2, every token of both ranks routed to the experts of rank 0, then of rank 1: with
    each CPU kernel the outputs and the input, router and expert gradients are those of one
    process running the unsharded layer (naive kernel) on each rank's tokens; the experts of
    the idle rank get exactly zero gradient."""
    from conftest import RESULT_TIMEOUT_S, spawned

    with spawned() as (start, results):
        for rank in range(2):
            start(_dispatch_rank, rank, str(tmp_path / "store"))
        got = dict(results.get(timeout=RESULT_TIMEOUT_S) for _ in range(2))
    for rank, value in got.items():
        assert not isinstance(value, str), f"rank {rank}:\n{value}"
    kernels = _kernels_on_cpu()
    assert {"naive", "sorted"} <= set(kernels)
    for target in TO_RANK:
        reference = _one_rank_moe("naive")
        per_rank = [_forward_backward(reference, _rank_tokens(rank), target) for rank in range(2)]
        experts_sum = {name: per_rank[0][name] + per_rank[1][name] for name in ("w1", "w3", "w2")}
        idle = slice(2, 4) if target == 0 else slice(0, 2)
        assert all(not g[idle].any() for g in experts_sum.values())  # the routing really is one-sided
        for kernel in kernels:
            for rank in range(2):
                ours = got[rank][kernel, target]
                for name in ("out", "x", "router"):
                    torch.testing.assert_close(torch.from_numpy(ours[name]), per_rank[rank][name], rtol=1e-5,
                                               atol=1e-6, msg=f"{kernel} to rank {target}: rank {rank} {name}")
                for name, want in experts_sum.items():  # the expert gradients hold both ranks' tokens
                    grad = torch.from_numpy(ours[name])
                    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6,
                                               msg=f"{kernel} to rank {target}: rank {rank} {name}")
                    assert not grad[idle].any()
    # Zero-computation experts: the same numbers as one process, and only FFN rows travel.
    reference = _one_rank_moe("naive", **ZERO_COMPUTE)
    per_rank = [_forward_backward(reference, _rank_tokens(rank), "zero") for rank in range(2)]
    routed = []
    for rank in range(2):
        reference.router.expert_bias_E.copy_(torch.tensor(ZERO_COMPUTE_BIAS))
        routed.append(reference.router(_rank_tokens(rank)[0])[1])
    zero_compute_rows = sum(int((experts >= 4).sum()) for experts in routed)
    assert zero_compute_rows > 0 and any(bool((e >= 4).all(1).any()) for e in routed)
    for kernel in kernels:
        for rank in range(2):
            ours = got[rank][kernel, "zero"]
            for name, want in per_rank[rank].items():
                if name in ("w1", "w3", "w2"):
                    want = per_rank[0][name] + per_rank[1][name]
                torch.testing.assert_close(torch.from_numpy(ours[name]), want, rtol=1e-5, atol=1e-6,
                                           msg=f"{kernel} with zero-computation experts: rank {rank} {name}")
            # Rows to the other rank's FFN experts and back, forward and backward; 16 bytes of
            # counts (4 int64, half to the other rank). A zero-computation row never travels.
            other = slice(2, 4) if rank == 0 else slice(0, 2)
            mine = slice(0, 2) if rank == 0 else slice(2, 4)
            rows_out = int(((routed[rank] >= other.start) & (routed[rank] < other.stop)).sum())
            rows_in = int(((routed[1 - rank] >= mine.start) & (routed[1 - rank] < mine.stop)).sum())
            assert ours["sent_bytes"] == 16 + (rows_out + rows_in) * ONE_RANK_DIM * 4 * 2, kernel
