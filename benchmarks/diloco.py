"""DiLoCo islands against plain data parallelism: loss, bytes on the wire, streaming on a slow link.

What it measures (every figure from real two-process runs under torchrun)
    1. Equal tokens, as the DiLoCo paper runs it: from a shared checkpoint
       (`--pretrain-steps`, default 300 steps of plain data parallelism), plain
       data parallelism (`parallel.dp=2 parallel.dp_shard=ddp`, one island)
       continues for `--steps` (300) against DiLoCo (`parallel.dp=1
       diloco.islands=2 diloco.inner_steps=H`, H = 50, started from the same
       checkpoint) with `diloco.quantize` none (fp32), int8 and int4. Same
       data.micro_batch per process, so every step of every run consumes the
       same 2 × micro_batch sequences, and the same validation windows.
       Printed: the final eval loss (metrics.jsonl's last row), DiLoCo / DDP
       (target ≤ 1.03), and the bytes sent during the continuation, the sum
       of metrics.jsonl `comm_bytes` (rank 0, one row per step), as DDP /
       DiLoCo (targets: fp32 ≥ 50×, int8 ≥ 190×, int4 ≥ 350×). DDP sends
       2·(dp−1)/dp = 1× the parameter bytes every step; DiLoCo sends the
       pseudo-gradient once per H steps (the islands' agreements go through
       the store, not the link), so fp32 is H×.
    2. Peak bytes per sync: the largest `bytes_sent` of island 0's
       `outer_step` events (events.jsonl) with `diloco.fragments=1` and with
       `diloco.fragments=4` (fp32; the two unthrottled runs of part 3), and
       their ratio (≈ 4: fragment 0 also holds the embedding and the last
       fragment the final norm and output head, so it is a little under 4).
    3. Compute utilisation on a throttled link. `diloco.bandwidth_mbit` (100
       and 1000 by default) holds each outer transfer back until a link of
       that speed would have delivered it. Blocking DiLoCo (fragments=1,
       overlap_steps=0, delayed_update=false) against streaming (fragments=4,
       delayed_update=true: each fragment's reduction overlaps a whole outer
       round; or `--overlap-steps N` for overlap_steps=N without the delayed
       update). Utilisation = ref / mean step time, where ref is the median
       `step_time_s` of the steps of the same run that start no sync (after
       its first round): an inner step with no outer communication cost,
       measured in the same run so that other work on the machine, which
       comes and goes between runs, does not skew the ratio (the mode's
       unthrottled run's ref is printed next to it as a check). Two means of
       the run's `step_time_s`:
       over the whole run (every row: the warm-up of the first steps and the
       final sync of every fragment at the last step included), and steady
       state, over the whole rounds 2 .. R−1 (each holds one sync of every
       fragment; no warm-up, no final sync). Target ≥ 90% for streaming. So
       that the link matters on this tiny model, this part uses H = 16
       (`--stream-inner-steps`) and R = 6 rounds (`--stream-steps 96`). The
       table shows the bytes per sync, the projected transfer time
       bytes·8/bandwidth, the link time per round (a full model) and the
       compute per round (H × ref), so the figures can be checked: blocking
       should cost about link/round per round; streaming hides the link while
       link/round < compute/round. The unthrottled rows show what a sync
       costs without any link: the reduction on this machine, the outer
       optimizer and the sha256 of the shared state after every outer step.

Model and data: the default recipe (recipes/default.yaml) unchanged: dim 128,
4 layers, 4 heads, 8 experts top-2, byte vocabulary (256), seq_len 128,
data.micro_batch 8 per process: 4.66 M parameters, 18.6 MB in fp32. Each
process runs one thread (`launch.threads_per_worker=1`, OMP_NUM_THREADS=1);
`data.max_bytes=4000000` of the standard library's source (no epoch
repeats); no checkpoints, memory snapshots, wandb or progress bar;
`logging.log_interval=1`. Defaults: part 1 run.steps 300 (6 outer steps),
part 3 run.steps 96. On 2 idle cores the whole script takes ~15 min (11
runs); `--quick` (part 1: 10 + 20 steps, H = 10; part 3: 24 steps, H = 8)
takes ~2 min, for smoke tests only: its losses say nothing.

Run (from the repository root):
    python benchmarks/diloco.py
    python benchmarks/diloco.py --quick
    python benchmarks/diloco.py --steps 500 --bandwidths 50 1000 [key=value ...]
    python benchmarks/diloco.py --parts 23    # parts 2 and 3 only (~4 min)

Each run lives in a temporary directory that is removed at the end; each is
started in its own process group and the group is ended when the run
returns or times out (`--timeout`). A failed run stops the script with one
line (after its stderr tail) and exit status 1; otherwise it exits 0 whether
or not the targets are met: it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import load_line, machine_line  # noqa: E402

from atoll.trainer.metrics import read_jsonl  # noqa: E402

PROCS = 2
FRAGMENTS = 4
COMMON = ["launch.threads_per_worker=1", "logging.wandb=disabled", "logging.progress=false",
          "logging.log_interval=1", "checkpoint.interval=0", "checkpoint.memory_interval=0",
          "data.max_bytes=4000000"]
DDP = ["parallel.dp=2", "parallel.dp_shard=ddp"]
ISLANDS = ["parallel.dp=1", "diloco.islands=2"]
QUANTIZE = ["none", "int8", "int4"]
TARGET_LOSS = 1.03
TARGET_BYTES = {"none": 50, "int8": 190, "int4": 350}
TARGET_UTIL = 0.90


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (smoke test)")
    parser.add_argument("--pretrain-steps", type=int, help="part 1 shared DDP steps (default 300; quick 10)")
    parser.add_argument("--steps", type=int, help="part 1 steps after them (default 300; quick 20)")
    parser.add_argument("--inner-steps", type=int, help="part 1 diloco.inner_steps (default 50; quick 10)")
    parser.add_argument("--stream-steps", type=int, help="parts 2-3 run.steps (default 96; quick 24)")
    parser.add_argument("--stream-inner-steps", type=int,
                        help=f"parts 2-3 diloco.inner_steps, a multiple of {FRAGMENTS} (default 16; quick 8)")
    parser.add_argument("--bandwidths", type=float, nargs="+", default=[100.0, 1000.0],
                        help="diloco.bandwidth_mbit values of part 3")
    parser.add_argument("--overlap-steps", type=int, default=0,
                        help="streaming with overlap_steps=N and no delayed update (default 0: delayed)")
    parser.add_argument("--parts", choices=["all", "1", "23"], default="all",
                        help="1: equal tokens only; 23: fragments and the throttled link only")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one run may take")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every run, key=value")
    args = parser.parse_args(argv)
    quick = args.quick
    args.steps = args.steps or (20 if quick else 300)
    args.pretrain_steps = args.pretrain_steps or (10 if quick else 300)
    args.inner_steps = args.inner_steps or (10 if quick else 50)
    args.stream_steps = args.stream_steps or (24 if quick else 96)
    args.stream_inner_steps = args.stream_inner_steps or (8 if quick else 16)
    if args.steps % args.inner_steps:
        parser.error(f"--steps {args.steps} must be a multiple of --inner-steps {args.inner_steps}")
    if args.stream_inner_steps % FRAGMENTS:
        parser.error(f"--stream-inner-steps {args.stream_inner_steps} must be a multiple of {FRAGMENTS}")
    if args.stream_steps % args.stream_inner_steps or args.stream_steps < 3 * args.stream_inner_steps:
        parser.error(f"--stream-steps {args.stream_steps} must be a multiple of --stream-inner-steps "
                     f"{args.stream_inner_steps}, at least three rounds")
    if not 0 <= args.overlap_steps < args.stream_inner_steps:
        parser.error("--overlap-steps must be below --stream-inner-steps")
    return args


# ------------------------------------------------------------------ runs

@dataclass
class Run:
    label: str
    rows: list[dict]
    outer: list[dict]  # island 0's outer_step events
    wall_s: float

    @property
    def eval_loss(self) -> float:
        return self.rows[-1]["eval_loss"]

    @property
    def comm_bytes(self) -> int:
        return sum(r["comm_bytes"] for r in self.rows)

    def step_times(self, after: int = 0, until: Optional[int] = None, skip_every: int = 0) -> list[float]:
        """step_time_s of the steps in (after, until], leaving out multiples of `skip_every`."""
        return [r["step_time_s"] for r in self.rows
                if after < r["step"] <= (until or r["step"]) and not (skip_every and r["step"] % skip_every == 0)]

    def fragment_bytes(self) -> dict[int, int]:
        """Each fragment's largest sync (island 0)."""
        sizes: dict[int, int] = {}
        for e in self.outer:
            sizes[e["fragment"]] = max(sizes.get(e["fragment"], 0), e["bytes_sent"])
        return sizes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def end_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """End every process left in the run's own process group (torchrun and its workers)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + grace_s
        while True:
            proc.poll()  # reap torchrun itself, or its zombie keeps the group alive
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            if time.monotonic() > deadline:
                break
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def failure_line(stderr: str) -> tuple[str, list[str]]:
    """The workers' own last words: stderr up to torchrun's summary, and the last of them
    that names an error."""
    lines = [line for line in stderr.splitlines()
             if line.strip() and not line.startswith("*****") and "OMP_NUM_THREADS" not in line]
    for i, line in enumerate(lines):
        if "failed (exitcode" in line or "ChildFailedError" in line or "death signal" in line:
            lines = lines[:i] or lines
            break
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["(no stderr)"])[-1].strip(), lines[-15:]


def train(args: argparse.Namespace, tmp: Path, label: str, overrides: list[str]) -> Run:
    """One `atoll train` run of PROCS processes under torchrun; its metrics and island 0's outer steps."""
    run_dir = tmp / label
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={PROCS}", "--nnodes=1",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "atoll.launch", "train",
           *COMMON, *overrides, *args.overrides, f"run.dir={run_dir}"]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TMPDIR=str(tmp))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    started = time.perf_counter()
    timed_out = False
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as proc:
        try:
            _, stderr = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            end_group(proc)
            _, stderr = proc.communicate()
        finally:
            end_group(proc)
    wall = time.perf_counter() - started
    rows = read_jsonl(run_dir / "metrics.jsonl")
    if timed_out or proc.returncode != 0 or not rows:
        line, tail = failure_line(stderr or "")
        print("\n".join(f"    {t}" for t in tail), file=sys.stderr)
        why = f"exit {proc.returncode}"
        if timed_out:
            why = f"timed out after {args.timeout:g} s"
            line = f"last step logged: {rows[-1]['step'] if rows else 'none'}"
        raise SystemExit(f"run {label} failed ({why}; {' '.join(overrides)}): {line}")
    outer = [e for e in read_jsonl(run_dir / "events.jsonl")
             if e.get("event") == "outer_step" and e.get("island") == 0]
    return Run(label, rows, outer, wall)


def mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def ms(s: float) -> str:
    return f"{s * 1e3:.0f} ms"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# ------------------------------------------------------------------ parts

def equal_tokens(args: argparse.Namespace, tmp: Path) -> tuple[Run, dict[str, Run]]:
    pre, total = args.pretrain_steps, args.pretrain_steps + args.steps
    common = [f"run.steps={total}", f"logging.eval_interval={total}"]
    base = train(args, tmp, "pretrain", [*common, *DDP, f"run.stop_at={pre}", f"checkpoint.interval={pre}"])
    print(f"  shared start: {pre} DDP steps, eval {base.eval_loss:.4f}, {base.wall_s:.0f} s", flush=True)
    common.append(f"checkpoint.resume={tmp / 'pretrain' / 'checkpoints' / f'step-{pre:08d}'}")
    ddp = train(args, tmp, "ddp", [*common, *DDP])
    print(f"  ddp: eval {ddp.eval_loss:.4f}, {mb(ddp.comm_bytes)} sent, {ddp.wall_s:.0f} s", flush=True)
    islands = {}
    for quantize in QUANTIZE:
        run = train(args, tmp, f"diloco_{quantize}",
                    [*common, *ISLANDS, f"diloco.inner_steps={args.inner_steps}",
                     f"diloco.quantize={quantize}"])
        islands[quantize] = run
        print(f"  diloco {quantize}: eval {run.eval_loss:.4f}, {mb(run.comm_bytes)} sent, "
              f"{len(run.outer)} outer steps, {run.wall_s:.0f} s", flush=True)
    return ddp, islands


def streaming_overrides(args: argparse.Namespace) -> list[str]:
    if args.overlap_steps:
        return [f"diloco.fragments={FRAGMENTS}", f"diloco.overlap_steps={args.overlap_steps}",
                "diloco.delayed_update=false"]
    return [f"diloco.fragments={FRAGMENTS}", "diloco.overlap_steps=0", "diloco.delayed_update=true"]


def throttled(args: argparse.Namespace, tmp: Path) -> dict[tuple[str, float], Run]:
    """Blocking and streaming DiLoCo (fp32), unthrottled (bandwidth 0) and at each bandwidth."""
    common = [f"run.steps={args.stream_steps}", "logging.eval_interval=0", *ISLANDS,
              f"diloco.inner_steps={args.stream_inner_steps}", "diloco.quantize=none"]
    modes = {"blocking": ["diloco.fragments=1", "diloco.overlap_steps=0", "diloco.delayed_update=false"],
             "streaming": streaming_overrides(args)}
    runs = {}
    for bandwidth in [0.0, *args.bandwidths]:
        for mode, overrides in modes.items():
            run = train(args, tmp, f"{mode}_{bandwidth:g}",
                        [*common, *overrides, f"diloco.bandwidth_mbit={bandwidth:g}"])
            runs[mode, bandwidth] = run
            mean = statistics.fmean(run.step_times())
            link = f"{bandwidth:g} Mbit/s" if bandwidth else "unthrottled"
            print(f"  {mode} {link}: mean step {ms(mean)}, {len(run.outer)} syncs, {run.wall_s:.0f} s",
                  flush=True)
    return runs


# ------------------------------------------------------------------ report

def report_equal_tokens(args: argparse.Namespace, ddp: Run, islands: dict[str, Run]) -> list[str]:
    print(f"### 1. Equal tokens: from a shared {args.pretrain_steps}-step DDP checkpoint, {args.steps} more "
          f"steps × {PROCS} processes; DiLoCo H = {args.inner_steps}")
    print()
    print("| run | final eval loss | / DDP (target ≤ 1.03) | bytes sent (rank 0) | DDP / this | target |")
    print("|---|---|---|---|---|---|")
    print(f"| DDP (dp=2) | {ddp.eval_loss:.4f} | 1.000 | {mb(ddp.comm_bytes)} | 1.0× | |")
    summary = []
    for quantize, run in islands.items():
        loss_ratio = run.eval_loss / ddp.eval_loss
        bytes_ratio = ddp.comm_bytes / run.comm_bytes
        name = "fp32" if quantize == "none" else quantize
        target = TARGET_BYTES[quantize]
        shown = f"{bytes_ratio:.2f}"
        if float(shown) >= target > bytes_ratio:  # rounding would hide a miss
            shown = f"{bytes_ratio:.6f}"
        print(f"| DiLoCo {name} | {run.eval_loss:.4f} | **{loss_ratio:.3f} {verdict(loss_ratio <= TARGET_LOSS)}** "
              f"| {mb(run.comm_bytes)} | **{shown}× {verdict(bytes_ratio >= target)}** "
              f"| ≥ {target}× |")
        summary.append(f"DiLoCo {name}: eval loss / DDP {loss_ratio:.3f} ({verdict(loss_ratio <= TARGET_LOSS)}), "
                       f"bytes DDP / DiLoCo {shown}× ({verdict(bytes_ratio >= target)}, ≥ {target}×)")
    print()
    return summary


def report_fragments(args: argparse.Namespace, runs: dict[tuple[str, float], Run]) -> list[str]:
    one, four = runs["blocking", 0.0], runs["streaming", 0.0]
    peak1 = max(e["bytes_sent"] for e in one.outer)
    peak4 = max(e["bytes_sent"] for e in four.outer)
    print(f"### 2. Peak bytes per sync (fp32, unthrottled runs of part 3: H = {args.stream_inner_steps}, "
          f"{args.stream_steps} steps; island 0's outer_step events)")
    print()
    print("| fragments | outer_step events | peak bytes per sync | bytes per fragment (largest sync each) |")
    print("|---|---|---|---|")
    for fragments, run, peak in ((1, one, peak1), (FRAGMENTS, four, peak4)):
        per = ", ".join(f"{f}: {mb(b)}" for f, b in sorted(run.fragment_bytes().items()))
        print(f"| {fragments} | {len(run.outer)} | {mb(peak)} ({peak:,} B) | {per} |")
    ratio = peak1 / peak4
    print()
    print(f"peak per sync, fragments=1 / fragments={FRAGMENTS}: **{ratio:.2f}** (target ≈ {FRAGMENTS}; "
          "the first fragment also holds the embedding, the last the final norm and head)")
    print()
    return [f"peak bytes per sync fragments=1 / {FRAGMENTS}: {ratio:.2f} (target ≈ {FRAGMENTS})"]


def report_throttled(args: argparse.Namespace, runs: dict[tuple[str, float], Run]) -> list[str]:
    h, steps = args.stream_inner_steps, args.stream_steps
    rounds = steps // h
    stream = (f"fragments={FRAGMENTS}, overlap_steps={args.overlap_steps}" if args.overlap_steps
              else f"fragments={FRAGMENTS}, delayed_update")
    sync_every = {"blocking": h, "streaming": h // FRAGMENTS}
    print(f"### 3. Compute utilisation on a throttled link (fp32, H = {h}, {steps} steps = {rounds} rounds; "
          f"blocking: fragments=1; streaming: {stream})")
    print()
    print(f"ref = median step_time_s of the run's steps that start no sync (steps > {h}; the "
          f"unthrottled run's in brackets); steady = mean over rounds 2..{rounds - 1} (steps {h + 1}..{steps - h}); "
          "whole = mean over every step (warm-up and the final sync included); utilisation = ref / mean. "
          "transfer/sync = peak bytes·8/bandwidth; link/round = a full model's bytes·8/bandwidth; "
          "compute/round = H × ref.")
    print()
    print("| mode | link | peak bytes/sync | transfer/sync | link/round | compute/round | ref step "
          "| steady mean | **steady util.** | whole mean | **whole util.** |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    summary = []
    for bandwidth in [0.0, *args.bandwidths]:
        for mode in ("blocking", "streaming"):
            run = runs[mode, bandwidth]
            ref = statistics.median(run.step_times(after=h, skip_every=sync_every[mode]))
            ref0 = statistics.median(runs[mode, 0.0].step_times(after=h, skip_every=sync_every[mode]))
            steady = statistics.fmean(run.step_times(after=h, until=steps - h))
            whole = statistics.fmean(run.step_times())
            peak = max(e["bytes_sent"] for e in run.outer)
            full = sum(run.fragment_bytes().values())
            if bandwidth:
                link = f"{bandwidth:g} Mbit/s"
                transfer, per_round = ms(peak * 8 / (bandwidth * 1e6)), ms(full * 8 / (bandwidth * 1e6))
            else:
                link, transfer, per_round = "unthrottled", "0", "0"
            marks = ["", ""]
            if bandwidth and mode == "streaming":
                marks = [f" {verdict(ref / steady >= TARGET_UTIL)}", f" {verdict(ref / whole >= TARGET_UTIL)}"]
            if bandwidth:
                summary.append(f"{mode} at {bandwidth:g} Mbit/s: utilisation steady {ref / steady:.1%}{marks[0]}, "
                               f"whole run {ref / whole:.1%}{marks[1]}"
                               + (f" (target ≥ {TARGET_UTIL:.0%})" if mode == "streaming" else ""))
            print(f"| {mode} | {link} | {mb(peak)} | {transfer} | {per_round} | {ms(h * ref)} | {ms(ref)} ({ms(ref0)}) "
                  f"| {ms(steady)} | **{ref / steady:.1%}{marks[0]}** "
                  f"| {ms(whole)} | **{ref / whole:.1%}{marks[1]}** |")
    print()
    return summary


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    print(f"machine: {machine_line(1)} per process, {PROCS} processes")
    print(load_line())
    print(f"model: recipes/default.yaml; {' '.join(COMMON)}"
          + (f" {' '.join(args.overrides)}" if args.overrides else "")
          + (" (--quick)" if args.quick else ""))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="atoll-diloco-bench-") as tmp:
        if args.parts in ("all", "1"):
            print(f"1. equal tokens ({args.pretrain_steps} shared + {args.steps} steps, H = {args.inner_steps})",
                  flush=True)
            ddp, islands = equal_tokens(args, Path(tmp))
        if args.parts in ("all", "23"):
            print(f"2-3. blocking vs streaming ({args.stream_steps} steps, H = {args.stream_inner_steps})",
                  flush=True)
            runs = throttled(args, Path(tmp))
    print(load_line())
    print(f"total {time.perf_counter() - started:.0f} s")
    print()
    summary = []
    if args.parts in ("all", "1"):
        summary += report_equal_tokens(args, ddp, islands)
    if args.parts in ("all", "23"):
        summary += report_fragments(args, runs)
        summary += report_throttled(args, runs)
    for line in summary:
        print(f"- {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
