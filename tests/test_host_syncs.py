"""Host syncs of the MoE path, counted without a GPU.

On a GPU the host waits for the device whenever a value has to come back to
Python (.item(), .tolist(), bool(t), ...) and whenever an op sizes its output
from the data (torch.bincount, torch.nonzero, boolean-mask indexing,
repeat_interleave with tensor repeats, torch.unique). `count_host_syncs` wraps
every one of these with pytest's monkeypatch and records each call, so the CPU
run counts what the GPU run would wait for. The kernels and layers under test
are the real ones.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # also set first thing by conftest.py

from atoll.parallel.kernels import get_kernel, grouped_mm_usable, tokens_per_expert  # noqa: E402
from atoll.trainer.moe import experts_naive, load_balancing_loss  # noqa: E402

CPU = torch.device("cpu")

_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy")
_DATA_SIZED = ("bincount", "nonzero", "unique", "unique_consecutive", "masked_select", "argwhere")


def _has_bool_mask(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def _tensor_repeats(_self_or_input, repeats=None, *args, output_size=None, **kwargs) -> bool:
    return isinstance(repeats, torch.Tensor) and output_size is None


def count_host_syncs(monkeypatch) -> list[str]:
    """Start counting; returns the list each counted call appends its name to
    (`monkeypatch.undo()` stops counting)."""
    calls: list[str] = []
    # The CPU kernels read counts where that costs nothing and a GPU would wait: take the GPU path.
    from atoll.parallel.kernels import sorted as sorted_kernels
    monkeypatch.setattr(sorted_kernels, "host_reads_are_free", lambda device: False)

    def wrap(owner, name, counts=lambda *args, **kwargs: True):
        original = getattr(owner, name, None)
        if original is None:
            return

        def counted(*args, **kwargs):
            if counts(*args, **kwargs):
                calls.append(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)

    for name in _READS:
        wrap(torch.Tensor, name)
    for name in _DATA_SIZED:
        wrap(torch, name)
        wrap(torch.Tensor, name)
    wrap(torch, "where", lambda *args, **kwargs: len(args) + len(kwargs) == 1)  # where(cond) = nonzero
    wrap(torch.Tensor, "__getitem__", lambda self, index: _has_bool_mask(index))
    wrap(torch.Tensor, "__setitem__", lambda self, index, value: _has_bool_mask(index))
    wrap(torch, "repeat_interleave", _tensor_repeats)
    wrap(torch.Tensor, "repeat_interleave", _tensor_repeats)
    return calls


def test_the_counter_sees_every_kind_of_sync(monkeypatch):
    x = torch.tensor([0, 2, 2, 1])
    calls = count_host_syncs(monkeypatch)
    torch.bincount(x)
    x.nonzero()
    x[x > 0]
    x.repeat_interleave(x)
    x.repeat_interleave(x, output_size=5)  # sized on the host: no sync
    x[torch.tensor([0, 1])]  # integer index: no sync
    torch.unique(x)
    float(x[0])
    monkeypatch.undo()
    assert calls == ["bincount", "nonzero", "__getitem__", "repeat_interleave", "unique", "__float__"]


def routed_inputs(T=40, D=16, H=24, E=4, K=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    experts_TK = torch.rand(T, E, generator=g).topk(K, dim=-1).indices
    gates_TK = torch.rand(T, K, generator=g).softmax(-1).requires_grad_()
    x_TD = torch.randn(T, D, generator=g, requires_grad=True)
    ws = [(torch.randn(E, D, H, generator=g) * D ** -0.5).requires_grad_(),
          (torch.randn(E, D, H, generator=g) * D ** -0.5).requires_grad_(),
          (torch.randn(E, H, D, generator=g) * H ** -0.5).requires_grad_()]
    return x_TD, gates_TK, experts_TK, *ws


def test_counts_per_expert_equal_bincount_and_stay_on_the_device(monkeypatch):
    experts_TK = routed_inputs()[2]
    kept_TK = torch.rand(experts_TK.shape, generator=torch.Generator().manual_seed(1)) < 0.7
    calls = count_host_syncs(monkeypatch)
    counts_E = tokens_per_expert(experts_TK, 6)
    kept_E = tokens_per_expert(experts_TK, 6, kept_TK)
    monkeypatch.undo()
    assert calls == []
    assert torch.equal(counts_E, torch.bincount(experts_TK.flatten(), minlength=6))
    assert torch.equal(kept_E, torch.bincount(experts_TK[kept_TK], minlength=6))
    probs_TE = torch.rand(40, 4).softmax(-1)
    calls = count_host_syncs(monkeypatch)
    loss = load_balancing_loss(probs_TE, experts_TK)
    monkeypatch.undo()
    assert calls == []
    f_E = torch.bincount(experts_TK.flatten(), minlength=4).float() / experts_TK.numel()
    assert torch.allclose(loss, 4 * (f_E * probs_TE.mean(0)).sum())


def kernel_syncs(monkeypatch, name: str) -> list[str]:
    """Host syncs of one forward and backward of kernel `name`, and its numbers against naive."""
    inputs = routed_inputs()
    kernel = get_kernel(name, CPU)
    calls = count_host_syncs(monkeypatch)
    out = kernel(*inputs)
    grads = torch.autograd.grad(out.square().sum(), [t for t in inputs if t.requires_grad])
    monkeypatch.undo()
    ref = experts_naive(*inputs)
    ref_grads = torch.autograd.grad(ref.square().sum(), [t for t in inputs if t.requires_grad])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    return calls


@pytest.mark.skipif(not grouped_mm_usable(CPU, torch.float32), reason="torch without _grouped_mm on CPU")
def test_grouped_mm_kernel_never_syncs(monkeypatch):
    assert kernel_syncs(monkeypatch, "grouped_mm") == []


def test_triton_kernel_never_syncs(monkeypatch):
    pytest.importorskip("triton")
    assert kernel_syncs(monkeypatch, "triton") == []


def test_reference_kernels_sync_where_documented(monkeypatch):
    """`sorted` reads all segment sizes once per forward (its Python loop needs them; backward
    reuses them); `naive` sizes each expert's rows with nonzero. Both are CPU/reference kernels."""
    assert kernel_syncs(monkeypatch, "sorted") == ["tolist"]
    assert kernel_syncs(monkeypatch, "naive") == ["nonzero"] * 4


def _ep_rank(rank: int, store_file: str, results) -> None:
    """One of two ep ranks: the host syncs of a MoE layer's forward and backward."""
    import datetime
    import traceback

    import torch.distributed as dist

    from atoll.parallel.expert_parallel import apply_expert_parallel
    from atoll.parallel.layout import Layout, ParallelMesh, ProcessEnv
    from atoll.trainer.config import MoEConfig
    from atoll.trainer.moe import MoE

    try:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=60))
        mesh = ParallelMesh(Layout(dp=2, ep=2), ProcessEnv(rank=rank, world_size=2), CPU)
        torch.manual_seed(0)
        moe = MoE(8, 12, MoEConfig(num_experts=4, top_k=2, kernel="grouped_mm"))
        apply_expert_parallel(moe, mesh)
        x = torch.randn(2, 10, 8, generator=torch.Generator().manual_seed(rank))
        calls = []
        for counting in (False, True):  # the second pass is counted
            with pytest.MonkeyPatch.context() as monkeypatch:
                if counting:
                    calls = count_host_syncs(monkeypatch)
                out, aux_loss, _ = moe(x)
                (out.square().sum() + aux_loss).backward()
        results.put((rank, calls))
        dist.destroy_process_group()
    except Exception:
        results.put((rank, traceback.format_exc()))


@pytest.mark.slow
@pytest.mark.skipif(not grouped_mm_usable(CPU, torch.float32), reason="torch without _grouped_mm on CPU")
def test_expert_parallel_syncs_once_per_layer_for_its_split_sizes(tmp_path):
    """The all-to-alls take their split sizes as Python ints: one read per layer forward, both
    directions together; backward reuses them, everything else stays on the device."""
    from conftest import RESULT_TIMEOUT_S, spawned

    with spawned() as (start, results):
        for rank in range(2):
            start(_ep_rank, rank, str(tmp_path / "store"))
        got = dict(results.get(timeout=RESULT_TIMEOUT_S) for _ in range(2))
    assert got == {0: ["tolist"], 1: ["tolist"]}, got
