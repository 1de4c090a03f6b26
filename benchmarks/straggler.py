"""Straggler detection on the default recipe: latency and false positives per slowdown.

    python benchmarks/straggler.py [--trials 10] [--slowdowns 1.1,1.25,1.5,2,4] [--window 20]
    python benchmarks/straggler.py --trials 2 --slowdowns 1.6 --window 10 --no-evict   # a quick look

For each slowdown one `atoll train` run (the default recipe on its own local
Ray cluster, `fault_tolerance.straggler=report`, checkpoints off) trains
until its first `--window` + 10 steps are done and its warm spares have
imported torch (the policy scores nothing before), then rank 1's process (pid
from the `workers` event) is duty-cycled from outside (SIGSTOP for
1 - 1/slowdown of every 10 ms, tests/slowdown.py), each rank pinned to a core
of its own as ranks on devices of their own are, in cycles: each "on"
phase is a trial that lasts until rank 1 is named (a `straggler` event) or
for window + 20 steps; each "off" phase lasts until rank 1 is cleared, and
window + 10 steps at least. Detection latency is the `straggler` event's step
minus the step at which the phase began, and its time minus the phase's
start. A `straggler` event naming rank 0, or naming rank 1 for a streak that
began in an "off" phase, is a false positive. A slowdown below 1 / threshold
(1.43x at the default 0.7) is not meant to be named: its "named" column
should read 0.

Printed: one table row per slowdown (trials named, latency median and max in
steps and seconds, false positives, steps run), then (unless `--no-evict`) the
tokens/s of 200 steps with a 1.6x straggler under report and under evict,
relative to a clean run (benchmarks/straggler_evict.py). Timings on a loaded machine
stretch the seconds, not the steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from machine import load_line, machine_line  # noqa: E402
from recovery import events, last_step, start, stop  # noqa: E402
from slowdown import duty_cycle, one_core_each, slowdown_fraction, spares_warm  # noqa: E402

from atoll.trainer.stragglers import ROLLING  # noqa: E402

SLOWED_RANK = 1
PERIOD_S = 0.01  # of the duty cycle: a fraction of a step, so that every step is slowed alike


def wait_until(predicate, proc, timeout_s: float = 600.0) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended: {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            raise RuntimeError("timed out")
        time.sleep(0.2)  # reading metrics.jsonl is not free on a busy machine


def named(run_dir: Path, rank: int, after: int) -> list[dict]:
    return [e for e in events(run_dir, "straggler") if e["rank"] == rank and e["step"] > after]


def cleared(run_dir: Path, rank: int, after: int) -> bool:
    return any(e["rank"] == rank and e["step"] > after for e in events(run_dir, "straggler_cleared"))


def detection_trials(tmp: Path, factor: float, trials: int, window: int) -> dict:
    """One run, `trials` on/off cycles of a `factor` slowdown of rank 1."""
    name = f"slow-{factor:g}x"
    proc, run_dir = start(tmp, name, ["run.steps=1000000", "fault_tolerance.straggler=report",
                                      f"fault_tolerance.straggler_window={window}"])
    phases, found = [], []  # (first step, last step) of each on phase; named trials
    try:
        wait_until(lambda: last_step(run_dir) >= window + 10 and spares_warm(proc.pid), proc)
        pids = [r["pid"] for r in events(run_dir, "workers")[-1]["ranks"]]
        for _ in range(trials):
            with one_core_each(pids), duty_cycle(pids[SLOWED_RANK], slowdown_fraction(factor),
                                                 period_s=PERIOD_S):
                onset, onset_time = last_step(run_dir), time.time()
                wait_until(lambda: named(run_dir, SLOWED_RANK, onset)
                           or last_step(run_dir) >= onset + window + 20, proc)
            ended = last_step(run_dir)
            phases.append((onset, ended))
            hit = named(run_dir, SLOWED_RANK, onset)
            if hit:
                found.append({"steps": hit[0]["step"] - onset, "seconds": hit[0]["time"] - onset_time})
                wait_until(lambda: cleared(run_dir, SLOWED_RANK, ended), proc)
            rest_from = last_step(run_dir)
            wait_until(lambda: last_step(run_dir) >= rest_from + window + 10, proc)
        steps = last_step(run_dir)
    finally:
        stop(proc)
    false_positives = 0
    for event in events(run_dir, "straggler"):
        in_trial = any(onset < event["since_step"] <= ended + ROLLING for onset, ended in phases)
        if event["rank"] != SLOWED_RANK or not in_trial:
            false_positives += 1
    return {"factor": factor, "trials": trials, "found": found, "false_positives": false_positives,
            "steps": steps}


def throughput_report_vs_evict(args) -> Optional[str]:
    """Throughput lost to a 1.6x straggler over 200 steps, `report` against `evict`, on a
    three-node cluster with a free node (benchmarks/straggler_evict.py); the summary line."""
    from straggler_evict import report_vs_evict

    if args.no_evict:
        return None
    with tempfile.TemporaryDirectory(prefix="atoll-evict-", dir="/tmp") as tmp:
        got = report_vs_evict(Path(tmp), steps=200, factor=1.6,
                              extra=(f"fault_tolerance.straggler_window={args.window}",))
    after = got.get("step_time_after_move")
    return (f"1.6x straggler over 200 steps, tokens/s of a clean run: report {got['report']:.3f}, "
            f"evict {got['evict']:.3f}" + (f"; step time after the move {after:.3f} of clean" if after else ""))


def row(result: dict) -> str:
    found = result["found"]
    if found:
        steps = [f["steps"] for f in found]
        seconds = [f["seconds"] for f in found]
        latency = (f"{statistics.median(steps):g} / {max(steps)} | "
                   f"{statistics.median(seconds):.1f} / {max(seconds):.1f}")
    else:
        latency = "- | -"
    return (f"| {result['factor']:g}x | {len(found)}/{result['trials']} | {latency} | "
            f"{result['false_positives']} | {result['steps']} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--slowdowns", default="1.1,1.25,1.5,2,4")
    parser.add_argument("--window", type=int, default=20, help="fault_tolerance.straggler_window")
    parser.add_argument("--no-evict", action="store_true", help="skip report vs evict throughput")
    args = parser.parse_args()
    print(machine_line())
    print(f"start: {load_line()}")
    results = []
    with tempfile.TemporaryDirectory(prefix="atoll-strag-", dir="/tmp") as tmp:
        for factor in [float(f) for f in args.slowdowns.split(",") if f]:
            results.append(detection_trials(Path(tmp), factor, args.trials, args.window))
            print(f"  {row(results[-1])}", flush=True)
        evict_line = throughput_report_vs_evict(args)
    print(f"end: {load_line()}")
    print(f"\nstraggler_window={args.window}, threshold 0.7 (named below it: slowdowns over 1.43x)")
    print("| slowdown | named | latency steps (median / max) | latency s (median / max) "
          "| false positives | steps run |")
    print("|---|---|---|---|---|---|")
    for result in results:
        print(row(result))
    if evict_line:
        print(f"\n{evict_line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
