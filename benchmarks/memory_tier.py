"""What the memory tier costs: tokens/s of the default run with a snapshot every step vs none.

What it measures
    The default recipe as users launch it (`atoll train`: the Ray launcher, 2
    workers), run with `checkpoint.memory_interval=1` and with `=0`, alternated
    (the side that goes first switches every pair) so that machine noise hits
    both alike. Each run's figure is the median `tokens_per_s` of steps
    FIRST-LAST of its metrics.jsonl (logged every step; steps before FIRST
    include start-up and the first snapshot's planning). For every
    `parallel.dp_shard` asked (fsdp and ddp by default) it prints the median
    of the per-pair ratios (with / without) and of each side. Target: >= 0.95.

    Only the training steps are compared: the run's own start (Ray, workers,
    model build) is the same on both sides and left out. Disk checkpoints and
    evaluation are off (`checkpoint.interval=0`, `logging.eval_interval=0`):
    they are not what is measured.

Run (from the repository root):
    python benchmarks/memory_tier.py                       # 3 pairs, fsdp and ddp
    python benchmarks/memory_tier.py --pairs 5 --modes ddp [key=value ...]

It always exits 0: it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIRST, LAST = 6, 35


def tokens_per_s(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    window = [row["tokens_per_s"] for row in rows if FIRST <= row["step"] <= LAST and "tokens_per_s" in row]
    if len(window) < (LAST - FIRST + 1) // 2:
        raise RuntimeError(f"{run_dir}: only {len(window)} logged steps in {FIRST}-{LAST}")
    return statistics.median(window)


def one_run(run_dir: Path, dp_shard: str, memory_interval: int, overrides: list[str]) -> float:
    args = [sys.executable, "-m", "atoll.launch", "train", f"run.dir={run_dir}", "run.overwrite=true",
            f"run.steps={LAST}", "logging.log_interval=1", "logging.eval_interval=0", "checkpoint.interval=0",
            f"parallel.dp_shard={dp_shard}", f"checkpoint.memory_interval={memory_interval}", *overrides]
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[2:])} exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    failed = [line for line in (run_dir / "events.jsonl").read_text().splitlines() if "snapshot_failed" in line]
    if failed:
        raise RuntimeError(f"memory snapshots failed: {failed[0]}")
    value = tokens_per_s(run_dir)
    print(f"  dp_shard={dp_shard} memory_interval={memory_interval}: {value:,.0f} tokens/s "
          f"({time.perf_counter() - started:.0f} s run)", flush=True)
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--modes", default="fsdp,ddp", help="parallel.dp_shard values, comma-separated")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for both sides")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="atoll-memory-tier-") as tmp:
        for mode in args.modes.split(","):
            with_s, without_s, ratios = [], [], []
            for pair in range(args.pairs):
                order = (1, 0) if pair % 2 == 0 else (0, 1)
                got = {interval: one_run(Path(tmp) / f"{mode}-{pair}-{interval}", mode, interval, args.overrides)
                       for interval in order}
                with_s.append(got[1])
                without_s.append(got[0])
                ratios.append(got[1] / got[0])
            results[mode] = (statistics.median(with_s), statistics.median(without_s), statistics.median(ratios))
    print(f"\nmemory tier cost, median tokens/s of steps {FIRST}-{LAST}, {args.pairs} alternated pairs")
    print(f"{'dp_shard':>8} {'snapshot every step':>20} {'no snapshots':>13} {'ratio':>6}")
    for mode, (with_tps, without_tps, ratio) in results.items():
        print(f"{mode:>8} {with_tps:>20,.0f} {without_tps:>13,.0f} {ratio:>6.3f}  "
              f"{'PASS' if ratio >= 0.95 else 'FAIL'} (target >= 0.95)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
