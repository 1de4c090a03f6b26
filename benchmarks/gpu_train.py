"""The GPU recipe on one GPU: tokens/s, MFU, peak memory, host syncs and checkpoint costs.

`moe_1b_8gpu` shrunk to one device (dp=1, `--layers` layers, data from a generated token
file) runs `--steps` steps in each mode (eager, compiled, activation checkpointing) in this
process, through atoll's own Trainer. Per mode it prints one row:

    mode | tokens/s | MFU | peak GiB | plan GiB | host syncs/step | loss first -> last

then the cost of the memory tier (snapshots at `checkpoint.memory_interval=auto`) and of an
async disk checkpoint, each as the step time with it over the eager step time without, and
the issue's targets (MFU >= 35% compiled, snapshot + checkpoint <= 3%, peak within 15% of
the plan). Host syncs are counted by CUDA itself (`torch.cuda.set_sync_debug_mode`), over the
steady-state steps that are not log steps.

    python benchmarks/gpu_train.py                 # on a GPU (part of benchmarks/gpu_check.sh)
    python benchmarks/gpu_train.py --smoke         # the same code on CPU, tiny model, 4 steps
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import load_line, machine_line  # noqa: E402

from atoll.parallel.layout import free_port
from atoll.parallel.memory_plan import plan_memory
from atoll.checkpoint.snapshot_store import ShmSnapshotStore, shm_root
from atoll.trainer.config import load_recipe
from atoll.trainer.hooks import RunControl
from atoll.trainer.mfu import model_flops_utilization
from atoll.trainer.train import Trainer

MODES = {  # name: recipe overrides
    "eager": [],
    "compiled": ["model.compile=true"],
    "ac_full": ["model.activation_checkpointing=full"],
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="steps per mode (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first steps per mode (default 5)")
    parser.add_argument("--layers", type=int, default=8, help="model.layers (default 8 of the recipe's 16)")
    parser.add_argument("--micro-batch", type=int, default=4, help="data.micro_batch (default 4)")
    parser.add_argument("--grad-accum", type=int, default=2, help="data.grad_accum (default 2)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, the default recipe's tiny model, 4 steps: checks the script runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup = 4, 2
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    return args


def token_file(folder: Path, vocab: int, tokens: int) -> Path:
    """Uniform random tokens: throughput does not depend on what the tokens say."""
    path = folder / "tokens.u32"
    np.random.default_rng(0).integers(0, vocab, size=tokens, dtype=np.uint32).tofile(path)
    return path


def recipe(args, folder: Path, name: str, extra: list[str]):
    """`moe_1b_8gpu` on one device (`--smoke`: the default recipe), for `--steps` steps."""
    shrink = [] if args.smoke else [
        f"data.path={folder / 'tokens.u32'}", f"model.layers={args.layers}",
        f"data.micro_batch={args.micro_batch}", f"data.grad_accum={args.grad_accum}"]
    return load_recipe(None if args.smoke else "moe_1b_8gpu", [
        *shrink, "parallel.dp=1", "launch.backend=local", f"run.dir={folder / name}", f"run.name={name}",
        f"run.steps={args.steps}", "checkpoint.interval=0", "checkpoint.memory_interval=0",
        "logging.eval_interval=0", "logging.wandb=disabled", "logging.progress=false",
        f"logging.log_interval={args.steps}", "optim.warmup_steps=2", *extra])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SyncCounter:
    """Counts the host synchronisations CUDA reports while it is active (none on CPU)."""

    def __init__(self, device: torch.device):
        self.device, self.count = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            self._warnings = warnings.catch_warnings(record=True)
            self._caught = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            self.count = sum("synchroniz" in str(w.message) for w in self._caught)
            self._warnings.__exit__(*exc)


def plan_gib(cfg, device: torch.device) -> float | None:
    """The dry-run plan's device total for the largest rank, less the CUDA context reserve
    (which `max_memory_allocated` does not see)."""
    if device.type != "cuda":
        return None
    total_gb = torch.cuda.get_device_properties(device).total_memory / 2**30
    plan = plan_memory(cfg, local_device_gb=total_gb, suggest=False)
    return (plan.peak - max(r.reserve for r in plan.ranks)) / 2**30


def run_mode(args, folder: Path, name: str, extra: list[str], control=None) -> dict:
    cfg = recipe(args, folder, name, extra)
    # each run its own store: the last one's may still be closing
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    trainer = Trainer(cfg, control=control)
    device = trainer.device
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        losses = []
        for _ in range(args.warmup):
            losses.append(trainer.one_step().loss)
        synchronize(device)
        timed = args.steps - args.warmup - 1  # the last step is a log step
        start = time.perf_counter()
        with SyncCounter(device) as syncs:
            for _ in range(timed):
                losses.append(trainer.one_step().loss)
            synchronize(device)
        elapsed = time.perf_counter() - start
        losses.append(trainer.one_step().loss)
        tokens_per_s = trainer.tokens_per_step * timed / elapsed
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        tflops = trainer.flops_per_token * tokens_per_s / 1e12
        mfu = model_flops_utilization(tflops, 1, trainer.peak_tflops) if trainer.peak_tflops else None
        return {"mode": name, "tokens_per_s": tokens_per_s, "step_s": elapsed / timed, "mfu": mfu,
                "peak_gib": peak, "plan_gib": plan_gib(cfg, device), "syncs_per_step": syncs.count / timed,
                "loss_first": losses[0], "loss_last": losses[-1]}
    finally:
        trainer.close()


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    print(machine_line(), flush=True)
    print(load_line(), flush=True)
    folder = Path(tempfile.mkdtemp(prefix="atoll-gpu-train-"))
    rows = []
    try:
        if not args.smoke:
            token_file(folder, load_recipe("moe_1b_8gpu").model.vocab_size, 40_000_000)
        print("mode      | tokens/s  | MFU    | peak GiB | plan GiB | host syncs/step | loss first -> last",
              flush=True)
        for name in args.modes.split(","):
            row = run_mode(args, folder, name, MODES[name])
            rows.append(row)
            print(f"{name:9} | {row['tokens_per_s']:9,.0f} | {fmt(row['mfu'], '6.1%')} | "
                  f"{fmt(row['peak_gib'], '8.2f')} | {fmt(row['plan_gib'], '8.2f')} | "
                  f"{row['syncs_per_step']:15.1f} | {row['loss_first']:.3f} -> {row['loss_last']:.3f}",
                  flush=True)
        eager = next((r for r in rows if r["mode"] == "eager"), None)
        if eager is not None:
            store = ShmSnapshotStore(shm_root(str(folder / "memory"), "gpu-train"))
            try:
                memory = run_mode(args, folder, "memory", ["checkpoint.memory_interval=auto"],
                                  control=RunControl(snapshot_store=store))
            finally:
                store.clear()
            interval = max(2, (args.steps - args.warmup) // 3)
            disk = run_mode(args, folder, "disk", [f"checkpoint.interval={interval}", "checkpoint.async=true"])
            snapshot_cost = memory["step_s"] / eager["step_s"] - 1
            checkpoint_cost = disk["step_s"] / eager["step_s"] - 1
            print(f"memory snapshots (memory_interval=auto): step {memory['step_s'] * 1e3:.1f} ms vs "
                  f"{eager['step_s'] * 1e3:.1f} ms eager: cost {snapshot_cost:+.1%}", flush=True)
            print(f"async disk checkpoint every {interval} steps: step {disk['step_s'] * 1e3:.1f} ms: "
                  f"cost {checkpoint_cost:+.1%}", flush=True)
            print_targets(rows, snapshot_cost + checkpoint_cost)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


def print_targets(rows: list[dict], checkpoint_cost: float) -> None:
    compiled = next((r for r in rows if r["mode"] == "compiled"), None)
    if compiled is not None and compiled["mfu"] is not None:
        print(f"target MFU >= 35% compiled: {compiled['mfu']:.1%} "
              f"{'met' if compiled['mfu'] >= 0.35 else 'NOT met'}")
    print(f"target snapshot + checkpoint <= 3%: {checkpoint_cost:+.1%} "
          f"{'met' if checkpoint_cost <= 0.03 else 'NOT met'}")
    for row in rows:
        if row["peak_gib"] is not None and row["plan_gib"]:
            off = row["peak_gib"] / row["plan_gib"] - 1
            print(f"target peak within 15% of the plan ({row['mode']}): {off:+.1%} "
                  f"{'met' if abs(off) <= 0.15 else 'NOT met'}")


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    sys.exit(main(sys.argv[1:]))
