"""CPU expert kernels against the naive reference: outputs and every gradient, fp32."""

from __future__ import annotations

import pytest
import torch

from atoll.parallel.kernels import KernelUnavailable, get_kernel, grouped_mm_usable, resolve
from atoll.trainer.moe import experts_naive

CPU = torch.device("cpu")
BACKENDS = ["sorted"] + (["grouped_mm"] if grouped_mm_usable(CPU, torch.float32) else [])


def routed_inputs(T, D, H, E, K, empty=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(E) if e not in empty])
    scores = torch.rand(T, len(allowed), generator=g)
    experts_TK = allowed[scores.topk(K, dim=-1).indices]  # k distinct experts per token
    gates_TK = torch.rand(T, K, generator=g).softmax(-1)
    x = torch.randn(T, D, generator=g)
    w1, w3 = torch.randn(E, D, H, generator=g) / D ** 0.5, torch.randn(E, D, H, generator=g) / D ** 0.5
    w2 = torch.randn(E, H, D, generator=g) / H ** 0.5
    return x, gates_TK, experts_TK, w1, w3, w2


def outputs_and_grads(kernel, x, gates, experts, w1, w3, w2):
    leaves = [t.clone().requires_grad_(True) for t in (x, gates, w1, w3, w2)]
    xl, gl, w1l, w3l, w2l = leaves
    out = kernel(xl, gl, experts, w1l, w3l, w2l)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return [out.detach()] + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,D,H,E,K,empty", [
    (37, 16, 32, 4, 2, (3,)),   # k > 1 with an expert that gets nothing
    (50, 8, 12, 8, 1, (0, 5)),  # k = 1, two empty experts
    (64, 16, 20, 8, 3, ()),     # uneven loads
    (1, 8, 12, 4, 2, ()),       # a single token
])
def test_backend_matches_naive(backend, T, D, H, E, K, empty):
    inputs = routed_inputs(T, D, H, E, K, empty)
    want = outputs_and_grads(experts_naive, *inputs)
    got = outputs_and_grads(get_kernel(backend, CPU), *inputs)
    for name, a, b in zip(("out", "x", "gates", "w1", "w3", "w2"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    for e in empty:  # experts that saw no token get exactly zero gradient
        assert not got[3][e].any() and not got[5][e].any()


@pytest.mark.parametrize("gpu_path", [False, True], ids=["cpu", "gpu-path"])
@pytest.mark.parametrize("backend", ["naive", *BACKENDS])
def test_skipped_assignments_cost_nothing_and_get_no_gradient(backend, gpu_path, monkeypatch):
    """Id E marks an assignment to a zero-computation expert (or one dropped): the kernel
    adds nothing for it and gives its gate zero gradient; the rest equal naive on the
    assignments that run, including tokens with every slot skipped. gpu-path: grouped_mm
    keeps the skipped rows (no host read of their count) and zeroes them, as on a GPU."""
    from atoll.parallel.kernels import sorted as sorted_kernels

    monkeypatch.setattr(sorted_kernels, "host_reads_are_free", lambda device: not gpu_path)
    T, D, H, E, K = 30, 8, 12, 4, 2
    x, gates, experts, w1, w3, w2 = routed_inputs(T, D, H, E, K, empty=(2,), seed=3)
    skipped = torch.rand(T, K, generator=torch.Generator().manual_seed(4)) < 0.4
    skipped[:3] = True  # tokens that run no FFN expert at all
    with_skips = experts.masked_fill(skipped, E)
    got = outputs_and_grads(get_kernel(backend, CPU), x, gates, with_skips, w1, w3, w2)
    # Reference: naive with the skipped slots' gates zeroed, i.e. their FFN computed and discarded.
    want = outputs_and_grads(experts_naive, x, gates * ~skipped, experts, w1, w3, w2)
    for name, a, b in zip(("out", "x", "w1", "w3", "w2"), [got[0], got[1], *got[3:]], [want[0], want[1], *want[3:]]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(got[2][~skipped], want[2][~skipped], rtol=1e-5, atol=1e-5, msg="gates")
    assert not got[2][skipped].any() and not got[0][:3].any() and not got[1][:3].any()


def test_no_tokens_at_all():
    x, gates, experts, w1, w3, w2 = routed_inputs(4, 8, 12, 4, 2)
    for backend in BACKENDS:
        out = get_kernel(backend, CPU)(x[:0], gates[:0], experts[:0], w1, w3, w2)
        assert out.shape == (0, 8)


def test_auto_and_unusable_kernels(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the CPU interpreter is for tests only
    assert resolve("auto", CPU) in BACKENDS
    if grouped_mm_usable(CPU, torch.float32):  # the measured rule: small expert GEMMs -> grouped_mm
        assert resolve("auto", CPU, torch.float32, expert_gemm=32 * 128 * 352) == "grouped_mm"
        assert resolve("auto", CPU, torch.float32, expert_gemm=256 * 512 * 1024) == "sorted"
    assert resolve("auto", CPU, torch.bfloat16, expert_gemm=32 * 128 * 352) == "sorted"  # grouped_mm: fp32 on CPU
    with pytest.raises(KernelUnavailable, match="model.moe.kernel=triton needs a CUDA GPU"):
        resolve("triton", CPU)
    with pytest.raises(KernelUnavailable, match="unknown MoE kernel 'fast'"):
        resolve("fast", CPU)


def test_gpu_check_stops_in_one_line_without_a_gpu():
    """benchmarks/gpu_check.sh runs to the point where it needs CUDA, then stops with one line."""
    import subprocess
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("with a GPU the script runs the real check (benchmarks/gpu_check.sh)")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, lines)
    assert lines[0].startswith("gpu_check: no CUDA GPU here (torch "), lines


def routed_to(T, D, H, E, pairs, seed=0):
    """Inputs where token t goes to the experts pairs[t] (shuffled token order)."""
    g = torch.Generator().manual_seed(seed)
    experts_TK = torch.tensor(pairs)[torch.randperm(T, generator=g)]
    gates_TK = torch.rand(T, experts_TK.shape[1], generator=g).softmax(-1)
    x = torch.randn(T, D, generator=g)
    w1, w3 = torch.randn(E, D, H, generator=g) / D ** 0.5, torch.randn(E, D, H, generator=g) / D ** 0.5
    w2 = torch.randn(E, H, D, generator=g) / H ** 0.5
    return x, gates_TK, experts_TK, w1, w3, w2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loads", [
    {(0, 3): 4500, (1, 3): 200},          # expert 0 alone over a chunk; 2 empty between chunks
    {(0, 1): 4200, (1, 2): 60, (2, 1): 40},  # the last expert empty, ending the last chunk
], ids=["empty-between-chunks", "empty-last-expert"])
def test_several_chunks_and_empty_experts_match_naive(backend, loads):
    """More rows than one chunk holds (CHUNK_ROWS; one expert alone exceeds it) with an expert
    that gets no row: output and every gradient equal naive's, the empty expert's exactly zero."""
    from atoll.parallel.kernels.sorted import CHUNK_ROWS, _chunks

    pairs = [pair for pair, count in loads.items() for _ in range(count)]
    inputs = routed_to(len(pairs), 8, 12, 4, pairs)
    counts = torch.bincount(inputs[2].flatten(), minlength=4).tolist()
    assert max(counts) > CHUNK_ROWS and 0 in counts
    assert len(list(_chunks(counts))) >= 2  # the chunked path, not one pass
    want = outputs_and_grads(experts_naive, *inputs)
    got = outputs_and_grads(get_kernel(backend, CPU), *inputs)
    for name, a, b in zip(("out", "x", "gates", "w1", "w3", "w2"), got, want):
        # Weight gradients sum thousands of rows: float error on the tensor's own scale.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item(), msg=name)
    empty = counts.index(0)
    for grad in got[3:]:
        assert not grad[empty].any()


CANDIDATES = [{"BLOCK_M": 64, "num_warps": 4}, {"BLOCK_M": 128, "num_warps": 8}, {"BLOCK_M": 256, "num_warps": 8}]


def test_tile_config_table_times_once_and_the_file_decides(tmp_path):
    """The fastest candidate that runs is chosen and written; a table on the same file (another
    rank, a restart) takes it without timing, even where its own timings would differ."""
    from atoll.parallel.kernels.tuning import TileConfigTable

    def needs_too_much_memory(config):
        if config["BLOCK_M"] == 256:
            raise RuntimeError("out of resources: shared memory")
        return 1.0 / config["BLOCK_M"]  # bigger tiles faster

    path = tmp_path / "kernels" / "triton_configs.json"
    first = TileConfigTable(path)
    assert first.choose("k N=8", CANDIDATES, needs_too_much_memory) == CANDIDATES[1]
    assert first.choose("k N=8", CANDIDATES, None) == CANDIDATES[1]  # remembered: not timed again
    assert (first.tuned, first.read) == (1, 0)

    def never(config):
        raise AssertionError("timed although the file holds a choice")

    restarted = TileConfigTable(path)
    assert restarted.choose("k N=8", CANDIDATES, never) == CANDIDATES[1]
    assert (restarted.tuned, restarted.read) == (0, 1)
    # a key the file lacks, or a saved config that is no longer a candidate, is tuned again
    assert restarted.choose("k N=16", CANDIDATES[:1], never) == CANDIDATES[0]  # one candidate: no timing
    other_candidates = TileConfigTable(path)
    assert other_candidates.choose("k N=8", CANDIDATES[2:] + CANDIDATES[:1], lambda c: 1.0 / c["BLOCK_M"]) == \
        CANDIDATES[2]
    assert (other_candidates.tuned, other_candidates.read) == (1, 0)
    with pytest.raises(RuntimeError, match="no tile config runs here"):
        TileConfigTable(None).choose("k", CANDIDATES[2:] * 2, needs_too_much_memory)


def test_ranks_that_meet_a_shape_together_share_one_choice(tmp_path):
    """Two ranks whose own timings disagree: the first to lock the file times, the other waits
    and takes its choice."""
    import threading
    import time

    from atoll.parallel.kernels.tuning import TileConfigTable

    path = tmp_path / "triton_configs.json"
    tables = [TileConfigTable(path), TileConfigTable(path)]
    chosen = [None, None]

    def rank(i):
        def timing(config):  # rank 0 finds the small tiles fast, rank 1 the big ones
            time.sleep(0.05)
            return config["BLOCK_M"] if i == 0 else -config["BLOCK_M"]
        chosen[i] = tables[i].choose("k", CANDIDATES[:2], timing)

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert chosen[0] == chosen[1]
    assert sorted((t.tuned, t.read) for t in tables) == [(0, 1), (1, 0)]
