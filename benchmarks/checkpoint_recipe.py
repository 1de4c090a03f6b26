"""Throughput cost of asynchronous checkpoints on a whole recipe, launched as users launch it.

What it measures
    `atoll train` on a recipe (default: the default recipe, 2 Ray workers with FSDP) with a
    disk checkpoint every `--interval` steps (default 10) against the same run without disk
    checkpoints (`checkpoint.interval=0`), everything else as the recipe says (memory
    snapshots included, in both), evaluation off in both. Throughput is the median of
    metrics.jsonl's `tokens_per_s` (one row per `logging.log_interval` steps, each row a
    window with one save when both are 10) over the rows after the first `--skip`
    (warm-up, the first save's writer start). The two runs alternate for `--rounds` rounds,
    which goes first alternating too; the ratio is the median over rounds of
    with / without. Target: >= 0.97.

Run (from the repository root; ~5 min on 2 cores with the defaults):
    python benchmarks/checkpoint_recipe.py
    python benchmarks/checkpoint_recipe.py --rounds 3 --steps 200 [--recipe NAME] [key=value ...]

It exits 0 whether or not the target is met: it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import load_line, machine_line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.97


def run(recipe: list[str], interval: int, steps: int, skip: int, run_dir: Path, overrides: list[str]) -> float:
    cmd = [sys.executable, "-m", "atoll.launch", "train", *recipe, f"run.steps={steps}",
           f"checkpoint.interval={interval}", "logging.eval_interval=0", "logging.log_interval=10",
           "logging.wandb=disabled", "logging.progress=false", f"run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if interval:
        commits = [e for e in map(json.loads, (run_dir / "events.jsonl").read_text().splitlines())
                   if e.get("event") == "checkpoint_commit"]
        if len(commits) < steps // interval:
            sys.exit(f"{run_dir}: {len(commits)} checkpoints committed, {steps // interval} expected")
    return statistics.median(r["tokens_per_s"] for r in rows[skip:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=None, help="recipe path or shipped name (default: default recipe)")
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip", type=int, default=2, help="metrics rows left out as warm-up")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for both runs, key=value")
    args = parser.parse_args()
    recipe = [args.recipe] if args.recipe else []
    print(machine_line(), flush=True)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}; {load_line()}", flush=True)
    ratios, with_ckpt, without = [], [], []
    with tempfile.TemporaryDirectory(prefix="atoll-ckpt-recipe-") as tmp:
        for r in range(args.rounds):
            order = (args.interval, 0) if r % 2 == 0 else (0, args.interval)
            got = {}
            for interval in order:
                got[interval] = run(recipe, interval, args.steps, args.skip, Path(tmp) / f"r{r}-{interval}",
                                    args.overrides)
            with_ckpt.append(got[args.interval])
            without.append(got[0])
            ratios.append(got[args.interval] / got[0])
            print(f"  round {r + 1}/{args.rounds}: tokens/s with a checkpoint every {args.interval} steps "
                  f"{got[args.interval]:,.0f}, without {got[0]:,.0f}: {ratios[-1]:.3f}; {load_line()}", flush=True)
    ratio = statistics.median(ratios)
    print(f"recipe {args.recipe or 'default'} {' '.join(args.overrides)}: tokens/s with / without "
          f"checkpoints (median of {args.rounds} rounds): {ratio:.3f}  target >= {TARGET}  "
          f"{'PASS' if ratio >= TARGET else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
