"""End-to-end training throughput: `model.moe.kernel=auto` against `naive`, over an (E, k) grid.

What it measures
    `atoll train` on the default recipe (dim 128, 4 layers, seq 128, 8 sequences per step)
    in one process (`launch.backend=local`, `parallel.dp=1`, all cores as torch threads)
    with `model.moe.num_experts=E`, `model.moe.top_k=k` for E in {8, 64}, k in {1, 2, 8},
    once with `model.moe.kernel=naive` and once with `auto`, each for `--steps` steps
    (default 14) without checkpoints, snapshots, evaluation or wandb. Throughput is the
    median `tokens_per_s` of metrics.jsonl over the steps after the first `--skip` (default
    4: warm-up). The two runs of a cell run back to back, alternating which goes first, so
    slow drifts of the machine hit both alike. Printed per cell: the kernel `auto` chose (the
    run's first line), both throughputs and auto / naive. Targets: auto / naive >= 1.5 at
    E=64 k=2, and >= 1.0 (never below naive) in every cell.

Run (from the repository root; ~6 min on 2 cores):
    python benchmarks/moe_end_to_end.py
    python benchmarks/moe_end_to_end.py --experts 64 --topk 2 --steps 20 data.micro_batch=32

It exits 0 whether or not the targets are met: it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import load_line, machine_line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET_AT_64_2 = 1.5


def run(kernel: str, experts: int, top_k: int, steps: int, threads: int, folder: Path,
        overrides: list[str]) -> tuple[list, str]:
    run_dir = folder / f"{kernel}-{experts}-{top_k}"
    cmd = [sys.executable, "-m", "atoll.launch", "train", "launch.backend=local", "parallel.dp=1",
           f"model.moe.num_experts={experts}", f"model.moe.top_k={top_k}", f"model.moe.kernel={kernel}",
           f"run.steps={steps}", "checkpoint.interval=0", "checkpoint.memory_interval=0",
           "logging.eval_interval=0", "logging.log_interval=1", "logging.wandb=disabled",
           "logging.progress=false", f"launch.threads_per_worker={threads}", f"run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    first = next((line for line in proc.stdout.splitlines() if line.startswith("training ")), "")
    choice = re.search(r"MoE kernel (\S+)(?: -> (\S+))?", first)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, (choice.group(2) or choice.group(1)) if choice else "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--topk", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--skip", type=int, default=4, help="warm-up steps left out of the median")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every run, key=value")
    args = parser.parse_args()
    print(machine_line(), flush=True)
    print(load_line(), flush=True)
    started = time.time()
    results = {}
    with tempfile.TemporaryDirectory(prefix="atoll-moe-e2e-") as tmp:
        for index, (E, K) in enumerate((E, K) for E in args.experts for K in args.topk if K <= E):
            order = ("naive", "auto") if index % 2 == 0 else ("auto", "naive")
            cell = {}
            for kernel in order:
                rows, chosen = run(kernel, E, K, args.steps, args.threads, Path(tmp), args.overrides)
                cell[kernel] = (statistics.median(r["tokens_per_s"] for r in rows[args.skip:]), chosen)
            results[E, K] = cell
            ratio = cell["auto"][0] / cell["naive"][0]
            print(f"  E={E} k={K}: naive {cell['naive'][0]:,.0f} tok/s, auto ({cell['auto'][1]}) "
                  f"{cell['auto'][0]:,.0f} tok/s, auto/naive {ratio:.2f}x", flush=True)
    print(load_line(), flush=True)
    print(f"total {time.time() - started:.0f} s\n")
    print("| E | k | auto chose | naive tok/s | auto tok/s | auto / naive |")
    print("|---|---|---|---|---|---|")
    for (E, K), cell in results.items():
        print(f"| {E} | {K} | {cell['auto'][1]} | {cell['naive'][0]:,.0f} | {cell['auto'][0]:,.0f} | "
              f"{cell['auto'][0] / cell['naive'][0]:.2f}x |")
    if (64, 2) in results:
        ratio = results[64, 2]["auto"][0] / results[64, 2]["naive"][0]
        print(f"\nauto / naive at E=64 k=2: {ratio:.2f}x  target >= {TARGET_AT_64_2}x  "
              f"{'PASS' if ratio >= TARGET_AT_64_2 else 'FAIL'}")
    worst = min(results.items(), key=lambda item: item[1]["auto"][0] / item[1]["naive"][0])
    ratio = worst[1]["auto"][0] / worst[1]["naive"][0]
    print(f"lowest auto / naive: {ratio:.2f}x at E={worst[0][0]} k={worst[0][1]}  target >= 1.0x  "
          f"{'PASS' if ratio >= 1.0 else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
