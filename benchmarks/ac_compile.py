"""Activation checkpointing's memory saved and torch.compile's speed-up, on one device.

What it measures
    The model of a recipe (recipes/default.yaml unless --recipe: its model,
    data.seq_len and data.micro_batch), single device, fp32, built and
    initialised as training does (Transformer + init_weights(run.seed)),
    trained on uniform random tokens with AdamW (lr 1e-4):

    1. Activation memory: the peak memory of one training step (forward,
       backward, optimizer step; after one warm-up step, so the optimizer
       state exists already) with model.activation_checkpointing none, full
       and selective (every model.ac_every-th block). On CPU the peak is the
       torch profiler's memory timeline (profile_memory, summed over its
       categories: parameters, gradients, optimizer state, activations,
       temporaries); on CUDA torch.cuda.max_memory_allocated. Printed: the
       peak, the peak above what the step starts with (the parameters and
       optimizer state held already: what is left is activations, gradients
       and temporaries), and on CPU the peak of the profiler's "activation"
       category alone, each also as a ratio to none.
    2. Compile speed: tokens/s of --steps training steps after --warmup steps
       (which compile), eager vs model.compile=true (inductor, each block
       compiled as training does), AC none, and their ratio. The two run
       interleaved in --rounds rounds (the median is printed), so machine
       noise hits both alike.

Usage: python benchmarks/ac_compile.py [--recipe default] [--steps 4] [--warmup 2]
       [--rounds 2] [--threads N] [--skip-memory] [--skip-compile]
Small defaults: about a minute on an idle 2-core CPU (compilation of the
first block dominates; a second run reuses inductor's cache).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf

from atoll.parallel.activation_checkpointing import apply_activation_checkpointing
from atoll.parallel.compile import apply_compile
from atoll.trainer.config import load_recipe, model_config
from atoll.trainer.model import Transformer
from atoll.trainer.loss import lm_loss


def build(cfg, device: torch.device, ac: str, compiled: bool):
    """(model, optimizer) for the recipe's model with the given AC mode and compile flag."""
    model_cfg = OmegaConf.merge(cfg.model, {"activation_checkpointing": ac, "compile": compiled})
    model = Transformer(model_config(OmegaConf.merge(cfg, {"model": model_cfg}))).to(device)
    model.init_weights(cfg.run.seed)
    apply_activation_checkpointing(model, model_cfg)
    apply_compile(model, model_cfg, log=print)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def batches(cfg, device: torch.device, count: int):
    generator = torch.Generator().manual_seed(0)
    shape = (cfg.data.micro_batch, cfg.data.seq_len + 1)
    for _ in range(count):
        window = torch.randint(0, cfg.model.vocab_size, shape, generator=generator).to(device)
        yield window[:, :-1], window[:, 1:]


def train_step(model, optimizer, inputs_BS, targets_BS) -> torch.Tensor:
    logits_BSV, aux_loss = model(inputs_BS)
    loss = lm_loss(logits_BSV, targets_BS) + aux_loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def step_peak_bytes(cfg, device: torch.device, ac: str) -> tuple[int, int, float]:
    """(peak bytes during one step, bytes held when it starts, peak bytes of activations: NaN
    where unknown), after a warm-up step."""
    model, optimizer = build(cfg, device, ac, compiled=False)
    (warm, measured) = batches(cfg, device, 2)
    train_step(model, optimizer, *warm)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        train_step(model, optimizer, *measured)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device), start, float("nan")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        train_step(model, optimizer, *measured)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated for CUDA snapshots; CPU has no other
        path = Path(folder) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        # Per sample: [0, parameters, optimizer state, inputs, temporaries, activations,
        # gradients, autograd detail, unknown] in bytes (torch/profiler/_memory_profiler.py).
        _times, sizes = json.loads(path.read_text())
    totals = [sum(sample) for sample in sizes]
    return max(totals), totals[0], max(sample[5] for sample in sizes)


def tokens_per_s(model, optimizer, cfg, device: torch.device, steps: int) -> float:
    tokens = cfg.data.micro_batch * cfg.data.seq_len * steps
    loss = None
    start = time.perf_counter()
    for inputs_BS, targets_BS in batches(cfg, device, steps):
        loss = train_step(model, optimizer, inputs_BS, targets_BS)
    float(loss)  # waits for the device
    return tokens / (time.perf_counter() - start)


def memory_table(cfg, device: torch.device) -> None:
    source = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "torch profiler memory timeline"
    print(f"\n1. peak memory of one training step (forward, backward, AdamW; {source}), MiB and / none")
    print(f"{'AC':<22}{'peak':>9}{'/ none':>8}{'above start':>13}{'/ none':>8}{'activations':>13}{'/ none':>8}")
    results = {}
    for ac in ("none", "full", "selective"):
        peak, start, activations = step_peak_bytes(cfg, device, ac)
        results[ac] = (peak, peak - start, activations)
        label = ac if ac != "selective" else f"selective (every {cfg.model.ac_every})"
        print(f"{label:<22}" + "".join(f"{value / 2**20:>{width}.1f}{value / reference:>8.3f}" for value, reference, width
                                       in zip(results[ac], results["none"], (9, 13, 13))))


def compile_table(cfg, device: torch.device, steps: int, warmup: int, rounds: int) -> None:
    print(f"\n2. training tokens/s over {steps} steps after {warmup} warm-up steps, {rounds} rounds")
    runs = {}
    for compiled in (False, True):
        model, optimizer = build(cfg, device, "none", compiled)
        start = time.perf_counter()
        tokens_per_s(model, optimizer, cfg, device, warmup)
        print(f"  {'compiled' if compiled else 'eager'} warm-up: {time.perf_counter() - start:.1f} s")
        runs[compiled] = (model, optimizer, [])
    for _ in range(rounds):
        for model, optimizer, speeds in runs.values():
            speeds.append(tokens_per_s(model, optimizer, cfg, device, steps))
    eager, compiled = (statistics.median(runs[flag][2]) for flag in (False, True))
    print(f"{'eager tokens/s':<22}{eager:>12,.0f}\n{'compiled tokens/s':<22}{compiled:>12,.0f}\n"
          f"{'compiled / eager':<22}{compiled / eager:>12.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="default")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_recipe(args.recipe)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m = cfg.model
    print(f"recipe {args.recipe}: dim {m.dim}, {m.layers} layers, {m.moe.num_experts} experts (top {m.moe.top_k}), "
          f"vocab {m.vocab_size}, batch {cfg.data.micro_batch} x {cfg.data.seq_len} tokens, fp32, "
          f"{device.type}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    if not args.skip_memory:
        memory_table(cfg, device)
    if not args.skip_compile:
        compile_table(cfg, device, args.steps, args.warmup, args.rounds)


if __name__ == "__main__":
    main()
