"""MoE expert computation: every kernel backend vs `naive` and vs a dense GEMM ceiling.

What it measures
    Forward + backward time of one call of each expert-computation backend of
    atoll.parallel.kernels (the `model.moe.kernel` choices) on the same routed
    batch, for E in {8, 64} experts and top-k in {1, 2, 8}, T=8192 tokens,
    D=512, H=1024 (SwiGLU experts: w1, w3 [E, D, H], w2 [E, H, D]):

    - inputs: x_TD and softmax gates_TK requiring grad, experts_TK = top-k of
      uniform random scores (k distinct experts per token, uniform-ish load),
      the three stacked weights requiring grad;
    - one timed call = kernel(...) then ((out * C).sum()).backward() with a
      fixed random C; gradients are set to None between calls;
    - backends: naive, sorted, grouped_mm (where `grouped_mm_usable`), triton
      (CUDA only; under TRITON_INTERPRET=1 on CPU it is far too slow to time);
    - the ceiling "dense": one SwiGLU on T*k rows with a single [D, H] pair and
      [H, D] weight, forward + backward: the same GEMM FLOPs as the routed
      computation with no routing, gathers or per-expert splits.

    Per (E, k) it prints the median and minimum time of each, the speed-up vs
    naive (naive / backend) and the fraction of dense throughput (dense /
    backend), all from medians of the same run; the rounds interleave the
    backends (the order rotates every round) so machine noise hits all alike.
    Column "cpu ms": median process CPU time per call (all threads), which
    waiting for a core that another process holds inflates less than wall time.
    The warm-up call of each backend is checked against naive (output and every
    gradient, max |diff| / max |ref|, column "err").
    Target lines: the best backend vs the dense ceiling at k=2: >= 50% at
    E=64 and >= 100% at E=8 (CPU); on CUDA also triton >= grouped_mm and
    triton >= 70% of dense at E=8 k=2. Then, for E=8 and E=64 at k=2, where
    the time of each fast backend goes: forward and backward, and the
    profiler's self time by kind of op (GEMM, sort, gather, scatter,
    elementwise, other).

    --ep-share measures instead the share of the all-to-all in a step of one
    MoE layer (atoll.trainer.moe.MoE, kernel `sorted`, E=8, k=2, T=2048 tokens
    per rank, D=512, H=1024) under expert parallelism ep=2 (Layout(dp=2, ep=2),
    gloo on 127.0.0.1, two spawned processes with one thread each): forward +
    backward of the layer is timed, and so is the time spent inside the
    all-to-alls by patching (in this process only)
    atoll.parallel.expert_parallel._all_to_all (rows out and back, forward and
    backward) and the counts exchange (`dist.all_to_all_single` as seen by
    that module). The time inside a collective includes waiting for the other
    rank.

Run (from the repository root):
    python benchmarks/moe_layer.py                          # full CPU table, fp32
    python benchmarks/moe_layer.py --quick                  # smoke run (T=1024)
    python benchmarks/moe_layer.py --threads 2 --repeat 5 [--experts 8 64] [--topk 1 2 8]
    python benchmarks/moe_layer.py --device cuda --dtype bf16   # GPU: adds triton
    python benchmarks/moe_layer.py --ep-share [--repeat 10]     # all-to-all share at ep=2

It always exits 0: it is a benchmark, not a test; the last lines say PASS/FAIL.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import load_line, machine_line  # noqa: E402

from atoll.parallel.kernels import get_kernel, grouped_mm_usable, triton_usable

D, H = 512, 1024
TARGET_OF_DENSE_AT_64 = 0.50  # CPU: best backend at E=64 k=2 vs the dense GEMM of equal FLOPs
TARGET_OF_DENSE_AT_8 = 1.00  # CPU: best backend at E=8 k=2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="MoE expert backends vs naive and vs a dense ceiling.")
    parser.add_argument("--quick", action="store_true", help="smoke run: T=1024 tokens, 2 rounds")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens T (default 8192, --quick 1024; --ep-share: per rank, default 2048)")
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--dim", type=int, default=D, help=f"model dim D (default {D})")
    parser.add_argument("--hidden", type=int, default=H, help=f"expert hidden size H (default {H})")
    parser.add_argument("--topk", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch intra-op threads (default: all cores)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed rounds per backend (default 5 on CPU, 20 on CUDA, 10 for --ep-share)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls per backend first (default 1 on CPU, 3 on CUDA)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="default fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--ep-share", action="store_true",
                        help="measure the all-to-all share of an MoE layer step at ep=2 (CPU, gloo)")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.tokens = args.tokens or (2048 if args.ep_share else 1024 if args.quick else 8192)
    args.repeat = args.repeat or (10 if args.ep_share else 2 if args.quick else 20 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    if min(args.tokens, args.repeat, args.threads, *args.experts, *args.topk) < 1 or args.warmup < 0:
        parser.error("sizes, --repeat and --threads must be positive")
    if any(k > e for k in args.topk for e in args.experts):
        parser.error("every --topk must be <= every --experts")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    return args


# ---------------------------------------------------------------- kernel table


def backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    names = ["naive", "sorted"]
    if grouped_mm_usable(device, dtype):
        names.append("grouped_mm")
    if device.type == "cuda" and triton_usable(device):
        names.append("triton")
    return names


def make_problem(T: int, E: int, K: int, device: torch.device, dtype: torch.dtype, seed: int = 0,
                 D: int = D, H: int = H):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    experts_TK = torch.rand(T, E, generator=g).topk(K, dim=-1).indices.to(device)  # distinct per token
    gates_TK = torch.randn(T, K, generator=g).softmax(-1).to(device)  # fp32, as the router's
    leaves = {"x": rand(T, D), "gates": gates_TK, "w1": rand(E, D, H, scale=D ** -0.5),
              "w3": rand(E, D, H, scale=D ** -0.5), "w2": rand(E, H, D, scale=H ** -0.5)}
    for t in leaves.values():
        t.requires_grad_(True)
    dense = {"x": rand(T * K, D), "w1": rand(D, H, scale=D ** -0.5), "w3": rand(D, H, scale=D ** -0.5),
             "w2": rand(H, D, scale=H ** -0.5)}
    for t in dense.values():
        t.requires_grad_(True)
    return experts_TK, leaves, rand(T, D), dense, rand(T * K, D)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def routed_step(kernel, experts_TK, leaves, C_TD):
    for t in leaves.values():
        t.grad = None
    out = kernel(leaves["x"], leaves["gates"], experts_TK, leaves["w1"], leaves["w3"], leaves["w2"])
    (out * C_TD).sum().backward()
    return out


def dense_step(dense, C_ND):
    for t in dense.values():
        t.grad = None
    x, w1, w3, w2 = dense["x"], dense["w1"], dense["w3"], dense["w2"]
    out = (F.silu(x @ w1) * (x @ w3)) @ w2
    (out * C_ND).sum().backward()
    return out


def max_err(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """Max over tensors of max |got - ref| / max |ref|."""
    worst = 0.0
    for a, b in zip(got, ref):
        scale = b.abs().max().float().clamp_min(1e-30)
        worst = max(worst, float((a.float() - b.float()).abs().max() / scale))
    return worst


def time_config(T, E, K, names, args, device, dtype) -> dict:
    experts_TK, leaves, C_TD, dense, C_ND = make_problem(T, E, K, device, dtype, D=args.dim, H=args.hidden)
    steps = {name: (lambda kern=get_kernel(name, device, dtype): routed_step(kern, experts_TK, leaves, C_TD))
             for name in names}
    steps["dense"] = lambda: dense_step(dense, C_ND)
    errs: dict[str, float] = {}
    ref = None
    for name, step in steps.items():  # warm-up; check each backend against naive
        for _ in range(max(args.warmup, 1 if name != "dense" else 0)):
            out = step()
        if name == "dense":
            continue
        got = [out.detach(), *(leaves[n].grad for n in ("x", "gates", "w1", "w3", "w2"))]
        if name == "naive":
            ref = [t.clone() for t in got]
        errs[name] = max_err(got, ref)
        del out, got
    del ref
    times = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    order = list(steps)
    for r in range(args.repeat):
        shift = r % len(order)
        for name in order[shift:] + order[:shift]:
            sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            steps[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)
    return {"times": times, "cpu": cpu, "errs": errs}


# Where a backend's time goes: torch profiler ops (self time) by kind.
_OP_KINDS = {
    "GEMM": ("aten::mm", "aten::bmm", "aten::addmm", "aten::_grouped_mm", "aten::matmul", "aten::linear"),
    "sort": ("aten::argsort", "aten::sort", "aten::bincount", "aten::cumsum", "aten::nonzero", "aten::eq",
             "aten::topk"),
    "gather": ("aten::index_select", "aten::index", "aten::gather"),
    "scatter": ("aten::index_add_", "aten::index_copy_", "aten::scatter_add_", "aten::index_put_"),
    "elementwise": ("aten::silu", "aten::silu_backward", "aten::mul", "aten::mul_", "aten::add_", "aten::add",
                    "aten::linalg_vecdot", "aten::sum", "aten::div"),
}


def breakdown(name: str, experts_TK, leaves, C_TD, device) -> str:
    """One line: forward and backward time of one call, and the profiler's self time by kind
    (GEMM, sort, gather, scatter, elementwise, other: allocation, copies, Python and launch)."""
    from torch.profiler import ProfilerActivity, profile

    kernel = get_kernel(name, device, leaves["x"].dtype)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for t in leaves.values():
        t.grad = None
    with profile(activities=activities) as prof:
        sync(device)
        start = time.perf_counter()
        out = kernel(leaves["x"], leaves["gates"], experts_TK, leaves["w1"], leaves["w3"], leaves["w2"])
        sync(device)
        middle = time.perf_counter()
        (out * C_TD).sum().backward()
        sync(device)
        end = time.perf_counter()
    use_cuda = device.type == "cuda"
    totals = {kind: 0.0 for kind in [*_OP_KINDS, "other"]}
    for event in prof.key_averages():
        self_us = event.self_device_time_total if use_cuda else event.self_cpu_time_total
        kind = next((k for k, ops in _OP_KINDS.items() if event.key in ops), "other")
        totals[kind] += self_us / 1e3
    whole = sum(totals.values()) or 1.0
    parts = ", ".join(f"{kind} {ms:.0f} ms ({ms / whole:.0%})" for kind, ms in totals.items())
    return (f"{name}: forward {1e3 * (middle - start):.0f} ms, backward {1e3 * (end - middle):.0f} ms "
            f"(under the profiler); {'device' if use_cuda else 'CPU'} self time: {parts}")


def run_table(args) -> None:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.set_num_threads(args.threads)
    names = backends(device, dtype)
    print(f"machine: {machine_line(torch.get_num_threads())}")
    if device.type == "cuda":
        print(f"tf32: torch.backends.cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
              f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
              f"float32_matmul_precision={torch.get_float32_matmul_precision()} (unchanged)")
    print(f"problem: T={args.tokens}, D={args.dim}, H={args.hidden}, {args.dtype} on {device}; E in {args.experts}, "
          f"k in {args.topk}; backends {', '.join(names)} + dense ceiling; "
          f"{args.warmup} warm-up + {args.repeat} interleaved rounds")
    print(f"start: {load_line()}", flush=True)
    results = {}
    header = (f"{'E':>3}{'k':>3}  {'backend':<11}{'median ms':>11}{'min ms':>10}"
              f"{'vs naive':>10}{'of dense':>10}{'cpu ms':>10}{'err':>10}")
    print()
    print(header)
    for E in args.experts:
        for K in args.topk:
            res = time_config(args.tokens, E, K, names, args, device, dtype)
            results[E, K] = res
            med = {n: statistics.median(ts) for n, ts in res["times"].items()}
            for name in [*names, "dense"]:
                err = f"{res['errs'][name]:.1e}" if name in res["errs"] else "-"
                cpu_ms = 1e3 * statistics.median(res["cpu"][name])
                print(f"{E:>3}{K:>3}  {name:<11}{1e3 * med[name]:>11.1f}{1e3 * min(res['times'][name]):>10.1f}"
                      f"{med['naive'] / med[name]:>9.2f}x{100 * med['dense'] / med[name]:>9.0f}%"
                      f"{cpu_ms:>10.1f}{err:>10}")
            print(f"   ({load_line()})", flush=True)
    print(f"end: {load_line()}")
    print()
    for E, K in [(E, K) for E in args.experts for K in args.topk if (E, K) in ((64, 2), (8, 2))]:
        print(f"where the time goes, E={E} k={K}:")
        experts_TK, leaves, C_TD, _, _ = make_problem(args.tokens, E, K, device, dtype, D=args.dim, H=args.hidden)
        for name in [n for n in names if n != "naive"]:
            print("  " + breakdown(name, experts_TK, leaves, C_TD, device))
    print()
    summarize(results, names, args)


TARGET_TRITON_VS_DENSE = 0.70  # GPU, E=8 k=2: the Triton kernel vs a dense bf16 GEMM of equal FLOPs


def summarize_gpu(results: dict, names: list[str], args) -> None:
    """The GPU targets: triton >= grouped_mm and >= 70% of dense at E=8 k=2."""
    if (8, 2) not in results or "triton" not in names:
        print("GPU targets: not measured (needs triton and E=8 k=2 in the grid)")
        return
    med = {n: statistics.median(ts) for n, ts in results[8, 2]["times"].items()}
    if "grouped_mm" in med:
        ratio = med["grouped_mm"] / med["triton"]
        print(f"triton vs grouped_mm at E=8 k=2: {ratio:.2f}x  target >= 1x  {'PASS' if ratio >= 1 else 'FAIL'}")
    else:
        print("triton vs grouped_mm at E=8 k=2: grouped_mm not available here")
    share = med["dense"] / med["triton"]
    verdict = "PASS" if share >= TARGET_TRITON_VS_DENSE else "FAIL"
    print(f"triton vs dense at E=8 k=2: {share:.0%}  target >= {TARGET_TRITON_VS_DENSE:.0%}  {verdict}")


def summarize(results: dict, names: list[str], args) -> None:
    if args.device == "cuda":
        summarize_gpu(results, names, args)
    fast = [n for n in names if n != "naive"]
    if not fast:
        return

    def best(E, K, ref):
        med = {n: statistics.median(ts) for n, ts in results[E, K]["times"].items()}
        name = min(fast, key=lambda n: med[n])
        return name, med[ref] / med[name]

    for E, K in [(E, K) for E in args.experts for K in args.topk]:
        name, speedup = best(E, K, "naive")
        print(f"  E={E} k={K}: best {name}, {speedup:.2f}x naive, {best(E, K, 'dense')[1]:.0%} of dense")
    for E, target in ((64, TARGET_OF_DENSE_AT_64), (8, TARGET_OF_DENSE_AT_8)):
        if (E, 2) not in results:
            print(f"best backend vs dense at E={E} k=2: not measured (add {E} to --experts and 2 to --topk)")
            continue
        name, share = best(E, 2, "dense")
        print(f"best backend vs dense at E={E} k=2: {share:.0%} ({name})  target >= {target:.0%}  "
              f"{'PASS' if share >= target else 'FAIL'}")


# ---------------------------------------------------------------- ep=2 all-to-all share


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ep_worker(rank: int, world: int, port: int, tokens: int, repeat: int, warmup: int) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo"})
    torch.set_num_threads(1)
    import warnings

    import torch.distributed as dist

    warnings.filterwarnings("ignore", message=".*all_to_all_single is deprecated", category=FutureWarning)

    import atoll.parallel.expert_parallel as ep_mod
    from atoll.parallel.layout import Layout, ParallelMesh, ProcessEnv
    from atoll.trainer.config import MoEConfig
    from atoll.trainer.moe import MoE

    timers = {"a2a": 0.0, "counts": 0.0}
    original_a2a = ep_mod._all_to_all

    class TimedAllToAll(torch.autograd.Function):
        """The project's _all_to_all both ways, each call timed (backward swaps the splits
        exactly as torch.distributed.nn.functional.all_to_all_single does)."""

        @staticmethod
        def forward(ctx, x_ND, out_splits, in_splits, group):
            ctx.splits, ctx.group = (out_splits, in_splits), group
            start = time.perf_counter()
            out = original_a2a(x_ND, out_splits, in_splits, group)
            timers["a2a"] += time.perf_counter() - start
            return out

        @staticmethod
        def backward(ctx, grad):
            out_splits, in_splits = ctx.splits
            start = time.perf_counter()
            back = original_a2a(grad.contiguous(), in_splits, out_splits, ctx.group)
            timers["a2a"] += time.perf_counter() - start
            return back, None, None, None

    class TimedDist:
        """torch.distributed as expert_parallel sees it, with the counts exchange timed."""

        def __getattr__(self, name):
            return getattr(dist, name)

        @staticmethod
        def all_to_all_single(*a, **kw):
            start = time.perf_counter()
            work = dist.all_to_all_single(*a, **kw)
            timers["counts"] += time.perf_counter() - start
            return work

    ep_mod._all_to_all = lambda x, out_s, in_s, group: TimedAllToAll.apply(x, out_s, in_s, group)
    ep_mod.dist = TimedDist()

    mesh = ParallelMesh(Layout(dp=2, ep=2), ProcessEnv.from_environ(), torch.device("cpu"))
    try:
        torch.manual_seed(0)  # same weights on both ranks before sharding
        moe = MoE(D, H, MoEConfig(num_experts=8, top_k=2, kernel="sorted"))
        ep_mod.apply_expert_parallel(moe, mesh)
        g = torch.Generator().manual_seed(1 + rank)  # each rank its own tokens
        x = torch.randn(1, tokens, D, generator=g, requires_grad=True)
        C = torch.randn(1, tokens, D, generator=g)
        params = [x, *moe.parameters()]

        def step() -> float:
            for p in params:
                p.grad = None
            dist.barrier()  # start together: skew would be charged to the first all-to-all
            start = time.perf_counter()
            out, aux, _ = moe(x)
            ((out * C).sum() + aux).backward()
            return time.perf_counter() - start

        for _ in range(warmup):
            step()
        rows = []
        for _ in range(repeat):
            timers.update(a2a=0.0, counts=0.0)
            total = step()
            rows.append((total, timers["a2a"], timers["counts"]))
        mine = torch.tensor(rows, dtype=torch.float64)
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        if rank == 0:
            report_ep(gathered, tokens, repeat)
    finally:
        mesh.close()


def report_ep(gathered: list[torch.Tensor], tokens: int, repeat: int) -> None:
    print(f"ep=2: MoE layer E=8 k=2 kernel=sorted, T={tokens} tokens per rank, D={D}, H={H}, fp32, "
          f"gloo on 127.0.0.1, 2 processes x 1 thread; {repeat} timed steps")
    print(f"{'rank':>4}{'step ms':>10}{'all-to-all ms':>15}{'counts ms':>11}{'share':>8}")
    shares = []
    for rank, rows in enumerate(gathered):
        total, a2a, counts = (statistics.median(rows[:, i].tolist()) for i in range(3))
        share = statistics.median(((rows[:, 1] + rows[:, 2]) / rows[:, 0]).tolist())
        shares.append(share)
        print(f"{rank:>4}{1e3 * total:>10.1f}{1e3 * a2a:>15.1f}{1e3 * counts:>11.2f}{share:>8.1%}")
    print(f"(medians per rank; all-to-all = the 4 row exchanges (2 forward, 2 backward); "
          f"counts = the 1 forward exchange of per-expert counts; time inside a collective includes "
          f"waiting for the other rank, so the rank that waited least bounds the transfer itself: "
          f"{min(shares):.1%}; {load_line()})")
    print(f"all-to-all share of MoE layer fwd+bwd at ep=2: {100 * statistics.mean(shares):.0f}%"
          f"  (mean of the 2 ranks)")


def run_ep_share(args) -> None:
    import torch.multiprocessing as mp

    print(f"machine: {machine_line(1)} per process")
    mp.spawn(_ep_worker, args=(2, _free_port(), args.tokens, args.repeat, max(args.warmup, 2)),
             nprocs=2, join=True)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.ep_share:
        run_ep_share(args)
    else:
        run_table(args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
