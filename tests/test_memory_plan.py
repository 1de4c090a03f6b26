"""The memory plan (`atoll train --dry-run`) against the real model on this CPU.

State parts (parameters, gradients, optimizer state) must be exact: against the model, its
gradients and a stepped AdamW in one process, and for dp=2 against torch.chunk, which is
how FSDP2 shards dim 0. Activations must be within 25% of what the CPU allocator really
holds, measured with torch's profiler (`peak_allocated`). The Ray object store of
`launch.ray_object_store_mb: auto` is sized from the state.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.checkpoint import checkpoint

from atoll.launch.ray_backend import ray_init_options
from atoll.parallel.layout import Layout
from atoll.parallel.memory_plan import (GIB, OBJECT_STORE_FLOOR_MB, checkpointed_blocks, choose_dp_shard, describe,
                                        object_store_bytes, plan_memory, replicated_state_bytes)
from atoll.trainer.config import OptimConfig, as_dataclass, load_recipe, model_config
from atoll.trainer.model import Transformer
from atoll.trainer.optim import build_optimizer
from atoll.trainer.loss import lm_loss
from conftest import run_cli

MB = 2**20


def build(cfg) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(model_config(cfg))
    model.init_weights(cfg.run.seed)
    return model


def batch(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shape = (cfg.data.micro_batch, cfg.data.seq_len)
    return (torch.randint(0, cfg.model.vocab_size, shape, generator=generator),
            torch.randint(0, cfg.model.vocab_size, shape, generator=generator))


def peak_allocated(fn) -> tuple[int, int]:
    """(peak, held at the end) bytes the CPU allocator gave out while `fn` ran, above what it
    held before. torch's profiler with profile_memory=True records every CPU allocation and
    free as a "[memory]" event carrying its signed size; summed in time order they are the
    allocator's level, whose maximum is the peak (blocks allocated before the profiler started
    and freed inside are not seen: callers warm up first)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    level = peak = 0
    for event in events:
        level += event.nbytes()
        peak = max(peak, level)
    return peak, level


class Checkpointed(torch.nn.Module):
    """A block under torch's (non-reentrant) activation checkpointing, as AC wraps it."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args):
        return checkpoint(self.block, *args, use_reentrant=False)


@pytest.mark.parametrize("recipe", ["default", "dense_tiny"])
def test_state_parts_are_exact_on_one_device(recipe):
    cfg = load_recipe(recipe, ["parallel.dp=1", "launch.backend=local"])
    plan = plan_memory(cfg).ranks[0]
    model = build(cfg)
    inputs, targets = batch(cfg)
    logits, aux = model(inputs[:2, :16])
    (lm_loss(logits, targets[:2, :16]) + aux).backward()
    optimizer = build_optimizer(model, as_dataclass(cfg.optim, OptimConfig))
    optimizer.step()

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    assert plan.params == nbytes(model.parameters())
    assert plan.grads == nbytes(p.grad for p in model.parameters())
    assert plan.optimizer == nbytes(state[key] for state in optimizer.state.values()
                                    for key in ("exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("overrides", [
    ["parallel.dp=2", "parallel.dp_shard=fsdp"],  # FSDP: every parameter's dim 0 in 2 chunks
    ["parallel.dp=4", "parallel.ep=2", "model.dim=90", "model.heads=5",  # experts: E/ep, then /2; uneven rows
     "parallel.dp_shard=fsdp"],
    ["parallel.dp=2", "parallel.ep=2", "parallel.dp_shard=fsdp"],  # experts split by ep only, the rest by FSDP
    ["parallel.dp=2", "parallel.dp_shard=ddp"],  # replicas (gradients are views of DDP's buckets)
])
def test_sharded_state_follows_fsdp_chunks(overrides):
    cfg = load_recipe("default", overrides)
    par = cfg.parallel
    plan = plan_memory(cfg).ranks[0]
    expected = 0
    for name, param in build(cfg).named_parameters():
        if ".experts." in name:
            param = param[:param.shape[0] // par.ep]  # this ep rank's experts
            shards = par.dp // par.ep if par.dp_shard == "fsdp" else 1
        else:
            shards = par.dp if par.dp_shard == "fsdp" else 1
        expected += 4 * torch.chunk(param, shards, dim=0)[0].numel()  # the first (largest) chunk
    assert plan.params == expected
    assert plan.optimizer == 2 * expected
    assert plan.grads == expected


@pytest.mark.parametrize("recipe,overrides", [
    ("default", []), ("dense_tiny", []),
    ("default", ["model.moe.kernel=naive", "model.moe.shared_expert=true", "model.moe.capacity_factor=1.0",
                 "data.micro_batch=2"]),
])
def test_activations_match_the_allocator(recipe, overrides):
    """AC none: the peak of forward and loss; AC full (torch's checkpoint around every
    block): what forward leaves for backward."""
    cfg = load_recipe(recipe, overrides)
    plan = plan_memory(cfg).ranks[0]  # no GPU and no launch.device_memory_gb: this CPU, fp32
    inputs, targets = batch(cfg)
    for mode in ("none", "full"):
        model = build(cfg)
        if mode == "full":
            for key in list(model.layers.keys()):
                model.layers[key] = Checkpointed(model.layers[key])
        model(inputs[:, :8])  # rope tables: not part of a step

        def step():
            logits, aux = model(inputs)
            step.kept = logits, lm_loss(logits, targets) + aux  # the train loop holds both

        peak, held = peak_allocated(step)
        measured = peak if mode == "none" else held
        planned = plan.activations[mode] + plan.logits
        assert abs(planned - measured) <= 0.25 * measured, (mode, planned / MB, measured / MB)


@pytest.mark.parametrize("recipe", ["default", "dense_tiny"])
def test_bf16_activations_match_the_allocator_under_cpu_autocast(recipe):
    cfg = load_recipe(recipe, ["model.dtype=bf16", "parallel.dp=1", "launch.backend=local",
                               "model.moe.kernel=sorted"])
    plan = plan_memory(cfg).ranks[0]
    model = build(cfg)
    inputs, targets = batch(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(inputs[:, :8])

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, aux = model(inputs)
            step.kept = logits, lm_loss(logits, targets) + aux  # the train loop holds both

    peak, _ = peak_allocated(step)
    planned = plan.activations["none"] + plan.logits + plan.weights_in_use  # autocast's weight casts
    assert abs(planned - peak) <= 0.25 * peak, (planned / MB, peak / MB)


def test_checkpointing_modes_and_pipeline_ranks():
    assert checkpointed_blocks([0, 1, 2, 3], "none", 2) == set()
    assert checkpointed_blocks([0, 1, 2, 3], "full", 2) == {0, 1, 2, 3}
    assert checkpointed_blocks([0, 1, 2, 3, 4], "selective", 2) == {1, 3}
    assert checkpointed_blocks([2, 3, 4], "selective", 2) == {3}  # a later pipeline stage
    cfg = load_recipe("dense_tiny", ["model.layers=4", "model.activation_checkpointing=selective"])
    plan = plan_memory(cfg).ranks[0]
    per_token_input = cfg.data.micro_batch * cfg.data.seq_len * cfg.model.dim * 4
    block = plan.recompute["full"]
    assert plan.activations["none"] - plan.activations["full"] == 4 * (block - per_token_input)
    assert plan.activations["none"] - plan.activations["selective"] == 2 * (block - per_token_input)
    # 1F1B on 2 stages: stage 0 holds 2 microbatches (and the embeddings), stage 1 one (and the
    # head and logits); ranks of a stage are grouped.
    cfg = load_recipe("dense_tiny", ["model.layers=4", "parallel.pp=2", "parallel.dp=2",
                                     "launch.backend=ray"])
    first, last = plan_memory(cfg).ranks
    assert (first.ranks, last.ranks) == ([0, 1], [2, 3])
    assert first.logits == 0 and last.logits > 0
    assert first.activations["none"] > 1.9 * last.activations["none"] - last.logits
    # DiLoCo islands keep the global parameters and the outer momentum next to the model.
    cfg = load_recipe("default", ["diloco.islands=2", "run.steps=100", "diloco.inner_steps=50"])
    plan = plan_memory(cfg).ranks[0]
    assert plan.outer == 2 * plan.params and plan.ranks == [0, 1, 2, 3]


def test_object_store_auto_is_sized_from_the_snapshot_state():
    cfg = load_recipe("default", ["checkpoint.memory_replicas=3"])  # Ray, dp=2, memory tier on (auto)
    state = 12 * sum(p.numel() for p in build(cfg).parameters())  # fp32 weights + AdamW's two
    expected = int(state * 3 * 2 * 1.25)  # replicas × (complete + in flight) × headroom
    assert expected > OBJECT_STORE_FLOOR_MB * MB
    assert ray_init_options(cfg)["object_store_memory"] == expected
    # one replica of the default model's 56 MB: the floor (a node's own shards are in /dev/shm)
    assert ray_init_options(load_recipe("default", []))["object_store_memory"] == OBJECT_STORE_FLOOR_MB * MB
    assert ray_init_options(load_recipe("default", ["launch.ray_object_store_mb=300"]))[
        "object_store_memory"] == 300 * MB
    off = load_recipe("default", ["checkpoint.memory_interval=0"])
    assert ray_init_options(off)["object_store_memory"] == OBJECT_STORE_FLOOR_MB * MB
    big = load_recipe("moe_1b_8gpu", [])
    assert object_store_bytes(big, machine_bytes=64 * GIB) == int(0.4 * 64 * GIB)  # capped


def test_dp_shard_auto_replicates_while_the_state_is_an_eighth_of_the_memory():
    """auto: DDP while fp32 weights, gradients and AdamW's moments,
    replicated, take at most 1/8 of a rank's memory; FSDP past it. The plan, the layout and
    the run see the chosen mode."""
    cfg = load_recipe("default", [])
    assert cfg.parallel.dp_shard == "auto" and cfg.parallel.dp == 2
    weights = 4 * sum(p.numel() for p in build(cfg).parameters())
    state = replicated_state_bytes(cfg)
    assert state == weights * (1 + 1 + 2)
    assert choose_dp_shard(cfg, 8 * state, "here").mode == "ddp"
    assert choose_dp_shard(cfg, 8 * state - 1, "here").mode == "fsdp"
    assert "replicated state" in choose_dp_shard(cfg, 8 * state, "here").why
    # Expert parallelism splits the experts before anything is replicated.
    ep = load_recipe("default", ["parallel.ep=2"])
    assert replicated_state_bytes(ep) < state
    assert choose_dp_shard(load_recipe("default", ["parallel.dp_shard=fsdp"]), 10**15, "").mode == "fsdp"
    assert choose_dp_shard(load_recipe("default", ["parallel.dp=1"]), 1, "").mode == "ddp"  # nothing to shard
    # The plan of auto is the plan of what auto chose (a GPU's budget from device_memory_gb).
    gb = 8 * state / GIB
    for budget, mode in ((gb, "ddp"), (gb * 0.99, "fsdp")):
        auto = load_recipe("default", [f"launch.device_memory_gb={budget}"])
        chosen = load_recipe("default", [f"launch.device_memory_gb={budget}", f"parallel.dp_shard={mode}"])
        assert plan_memory(auto).ranks == plan_memory(chosen).ranks
        layout = Layout.from_recipe(auto)
        assert layout.dp_shard == mode and f"dp_shard={mode} (auto: " in layout.describe()
        assert layout.to_dict()["dp_shard"] == mode
    # The 1B recipe's state does not fit 1/8 of an 80 GB GPU: it shards.
    assert Layout.from_recipe(load_recipe("moe_1b_8gpu", ["parallel.dp_shard=auto",
                                                          "launch.device_memory_gb=80"])).dp_shard == "fsdp"


def test_verdict_lines():
    cfg = load_recipe("moe_1b_8gpu", ["launch.device_memory_gb=80"])
    plan = plan_memory(cfg)
    assert plan.device == "cuda" and plan.compute == "bf16" and plan.fits
    assert any(line.startswith("# fits:") for line in describe(plan))
    no_gpu = describe(plan_memory(load_recipe("moe_1b_8gpu", [])))
    assert any("set launch.device_memory_gb=" in line for line in no_gpu)
    # Every suggested change really brings the figure it names.
    small = plan_memory(load_recipe("moe_1b_8gpu", ["launch.device_memory_gb=12"]))
    assert small.fits is False and small.suggestions
    override, total = next(s for s in small.suggestions if s[0] == "model.activation_checkpointing=full")
    changed = plan_memory(load_recipe("moe_1b_8gpu", ["launch.device_memory_gb=12", override]))
    assert changed.peak == total < small.peak


def test_dry_run_prints_the_plan_and_names_the_key_to_change(tmp_path):
    tokens = tmp_path / "tokens.u32"
    tokens.write_bytes(bytes(4 * 100_000))
    result = run_cli(["train", "--dry-run", "moe_1b_8gpu", "launch.device_memory_gb=12",
                      f"data.path={tokens}"], timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "# memory plan per rank (GPU, bf16 compute" in out
    assert "#   ranks" in out and "0-7" in out  # the 8 identical FSDP ranks in one column
    for row in ("parameters (fp32 master)", "gradients (fp32)", "optimizer state (fp32)",
                "activations (AC none)", "activations (AC full)", "logits", "host: memory snapshot",
                "host: checkpoint staging", "total on the device"):
        assert row in out, row
    assert "# DOES NOT FIT" in out
    assert "#   try parallel.pp=2: " in out and "(fits)" in out  # a key, the figure it brings
    assert math.isfinite(float(out.split("DOES NOT FIT: ")[1].split()[0]))
