"""The memory plan of a recipe: what each rank holds on its device and on its host, in bytes.

`plan_memory(cfg)` answers, per rank, before anything runs: the fp32 master
parameters as the layout shards them, the compute-dtype copies of the weights
in use (FSDP's gathered units, or autocast's casts), gradients, optimizer
state, activations of the micro-batches in flight (with each activation
checkpointing mode), the logits, and on the host the memory-tier snapshot and
the checkpoint staging buffer; then the total against the device's memory,
and which recipe key to change when it does not fit. `atoll train --dry-run`
prints it, `object_store_bytes` sizes the Ray object store of a cluster
atoll starts (`launch.ray_object_store_mb: auto`), and `choose_dp_shard`
resolves `parallel.dp_shard: auto` from the replicated state it sizes.

Parameter shapes come from the model itself, built on the meta device (no
memory, no values); everything else is arithmetic on the recipe, following
the layout rules of parallel/ (FSDP2 dim-0 shards over dp, experts split over
ep, pipeline stages and schedules, activation checkpointing per block) and
what autograd keeps for each op of trainer/model.py and trainer/moe.py
(`block_activation_bytes`). This module must not touch torch.distributed, Ray
or a device: it is a pure function of the recipe (and of the device memory
the caller reports).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field, replace
from typing import Optional

from omegaconf import DictConfig, OmegaConf

GIB = 2**30
# CUDA context, NCCL's buffers and the caching allocator's slack: on the device but never
# seen by torch's allocator statistics.
GPU_RUNTIME_RESERVE = 1 * GIB
# The Ray object store of a cluster atoll starts holds the memory tier's snapshots: the
# complete one and the one being written (2 generations), each on memory_replicas+1 keepers.
OBJECT_STORE_GENERATIONS = 2
OBJECT_STORE_HEADROOM = 1.25
OBJECT_STORE_FLOOR_MB = 256
OBJECT_STORE_MAX_FRACTION = 0.4  # of the machine's memory (Ray's own default is 0.3)
# parallel.dp_shard: auto replicates (DDP) while the state DDP replicates on every rank (fp32
# weights and gradients, optimizer and DiLoCo state) takes at most
# this share of a rank's memory. DDP reduces once per step where FSDP gathers every unit twice
# and reduce-scatters: on small models that per-unit work, not memory, bounds the step. 1/8
# leaves 7/8 for activations, logits and the runtime on a GPU, and on a CPU room beside the
# state for the memory snapshot and the checkpoint staging copy (a copy of weights and
# optimizer state each); past it, sharding's memory saving is worth its collectives.
DDP_MAX_STATE_SHARE = 8


@dataclass
class RankPlan:
    """Bytes of one group of identical ranks (same pipeline stage; FSDP shards rounded up)."""
    ranks: list[int]
    holds: str  # which layers (and embeddings / head) these ranks hold
    params: int  # fp32 master weights, this rank's shard
    weights_in_use: int  # compute-dtype copies: FSDP's gathered units, or autocast's weight casts
    grads: int
    optimizer: int
    outer: int  # DiLoCo: global parameters and outer optimizer state (fp32, on the device)
    activations: dict[str, int]  # AC mode -> bytes kept by forward for backward (in-flight microbatches)
    recompute: dict[str, int]  # AC mode -> one block's activations, rebuilt during backward
    logits: int  # kept by forward (the loss's inputs) for the microbatches in flight
    logits_grad: int  # their gradient at the start of backward
    snapshot_host: int  # memory tier: this rank's share of a snapshot (host)
    staging_host: int  # async disk checkpoint: this rank's staging buffer (host)
    reserve: int  # GPU runtime reserve

    def device_total(self, ac: str) -> int:
        # Backward frees the loss's tensors before it reaches a checkpointed block: the
        # logits and a block's recompute are never alive together, the larger one counts.
        return (self.params + self.weights_in_use + self.grads + self.optimizer + self.outer + self.activations[ac]
                + max(self.logits + self.logits_grad, self.recompute[ac]) + self.reserve)


@dataclass
class MemoryPlan:
    device: str  # "cuda" (plan for a GPU) or "cpu"
    compute: str  # "bf16" or "fp32"
    ac: str  # the recipe's model.activation_checkpointing
    ac_every: int
    budget: Optional[int]  # bytes per device; None: no verdict
    ranks: list[RankPlan]
    object_store: int  # bytes `launch.ray_object_store_mb: auto` would give a cluster atoll starts
    object_store_need: int  # what the memory tier's snapshots want there
    tokens: str  # "micro_batch × seq_len" as planned
    loss_note: str
    suggestions: list[tuple[str, int]] = field(default_factory=list)  # (overrides, worst total)

    @property
    def peak(self) -> int:
        return max(r.device_total(self.ac) for r in self.ranks)

    @property
    def fits(self) -> Optional[bool]:
        return None if self.budget is None else self.peak <= self.budget


# --------------------------------------------------------------------------- the plan


def plan_memory(cfg: DictConfig, local_device_gb: Optional[float] = None,
                suggest: bool = True) -> MemoryPlan:
    """The plan of recipe `cfg`. The budget is `launch.device_memory_gb` (GiB), else
    `local_device_gb` (the caller's GPU, if any); with a budget the plan is for a GPU,
    without one for the CPU this runs on (and carries no verdict)."""
    gb = cfg.launch.device_memory_gb or local_device_gb
    device = "cuda" if gb else "cpu"
    if cfg.parallel.dp_shard == "auto":
        world = cfg.diloco.islands * cfg.parallel.pp * cfg.parallel.dp  # on this machine, as planned
        cfg = with_dp_shard(cfg, choose_dp_shard(cfg, *rank_memory_bytes(cfg, local_device_gb, world)).mode)
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    shapes = _param_shapes(cfg)
    layers_per_stage, stages_of = _stages(cfg)
    pp, dp, islands = cfg.parallel.pp, cfg.parallel.dp, cfg.diloco.islands
    ranks = []
    for pp_rank in range(pp):
        stages = stages_of(pp_rank)
        plan = _rank_plan(cfg, device, dtype, shapes, [layers_per_stage[s] for s in stages],
                          first=0 in stages, last=len(layers_per_stage) - 1 in stages, pp_rank=pp_rank)
        plan.ranks = [i * pp * dp + pp_rank * dp + j for i in range(islands) for j in range(dp)]
        ranks.append(plan)
    if pp > 1 and all(_same(ranks[0], r) for r in ranks[1:]):
        ranks = [replace(ranks[0], ranks=sorted(sum((r.ranks for r in ranks), [])))]
    micro = cfg.data.micro_batch
    plan = MemoryPlan(device=device, compute=dtype, ac=cfg.model.activation_checkpointing,
                      ac_every=cfg.model.ac_every, budget=int(gb * GIB) if gb else None, ranks=ranks,
                      object_store=object_store_bytes(cfg), object_store_need=snapshot_store_need(cfg),
                      tokens=f"{micro} × {cfg.data.seq_len}",
                      loss_note=_loss_note(dtype))
    if suggest and plan.fits is False:
        plan.suggestions = _suggestions(cfg, plan, gb)
    return plan


def _same(a: RankPlan, b: RankPlan) -> bool:
    return {**vars(a), "ranks": None, "holds": None} == {**vars(b), "ranks": None, "holds": None}


def _param_shapes(cfg: DictConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of the single-device model (built on meta: no memory)."""
    import torch

    from atoll.trainer.config import model_config
    from atoll.trainer.model import Transformer

    with torch.device("meta"):
        model = Transformer(model_config(cfg))
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _stages(cfg: DictConfig):
    """(layer ids per pipeline stage, pp rank -> its stage ids), as parallel/pipeline.py splits."""
    from atoll.parallel.pipeline import stage_layers, stages_of_rank

    par = cfg.parallel
    if par.pp == 1:
        return [list(range(cfg.model.layers))], lambda pp_rank: [0]
    virtual = par.pp_virtual_stages if par.pp_schedule == "interleaved_1f1b" else 1
    layers = stage_layers(cfg.model.layers, par.pp * virtual, par.pp_first_last_layers)
    return layers, lambda pp_rank: stages_of_rank(pp_rank, par.pp, virtual)


def _layer_of(name: str) -> Optional[int]:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "layers" else None


def is_expert(name: str) -> bool:
    return ".experts." in name


def local_numel(name: str, shape: tuple[int, ...], cfg: DictConfig) -> int:
    """Elements of `name` a rank holds: FSDP2 shards dim 0 into dp chunks of ceil(dim0/dp)
    rows (the first ranks hold that many; FSDP keeps every shard padded to it), experts are
    first split over ep (E/ep each), then sharded over dp/ep when FSDP has ranks left."""
    par = cfg.parallel
    rest = math.prod(shape[1:])
    rows = shape[0]
    fsdp = par.dp > 1 and par.dp_shard == "fsdp"
    if is_expert(name):
        rows //= par.ep
        shards = par.dp // par.ep if fsdp else 1
    else:
        shards = par.dp if fsdp else 1
    return math.ceil(rows / shards) * rest


def _rank_plan(cfg: DictConfig, device: str, dtype: str, shapes: dict, stage_layers: list[list[int]],
               first: bool, last: bool, pp_rank: int) -> RankPlan:
    par, model = cfg.parallel, cfg.model
    layers = {i for stage in stage_layers for i in stage}
    root = {n for n in shapes if (n.startswith("tok_embeddings") and first)
            or (n.startswith(("norm", "output")) and last)}
    mine = {n: s for n, s in shapes.items() if n in root or _layer_of(n) in layers}
    fsdp = par.dp > 1 and par.dp_shard == "fsdp"
    mixed = dtype == "bf16"

    local = {n: local_numel(n, s, cfg) for n, s in mine.items()}
    params = 4 * sum(local.values())
    grads = params  # under DDP they are views into its buckets (gradient_as_bucket_view)
    optimizer = optimizer_states(cfg) * params
    outer = diloco_copies(cfg) * params

    weights_in_use = _weights_in_use(cfg, mine, fsdp, mixed)

    c = 2 if mixed else 4
    # The residual stream is bf16 only where FSDP casts the blocks' inputs and weights (mixed
    # precision); under autocast alone it stays fp32 (embeddings and norms are not autocast).
    r = 2 if (mixed and fsdp) else 4
    microbatches = (par.microbatches or par.pp) if par.pp > 1 else 1
    tokens = cfg.data.micro_batch // microbatches * cfg.data.seq_len
    in_flight, logits_in_flight = _in_flight(cfg, pp_rank, microbatches)
    per_block = block_activation_bytes(cfg, tokens, c, r)
    blocks = [i for stage in stage_layers for i in stage]
    edge = tokens * (8 if first else 0)  # token ids (the embedding's saved input)
    if last:
        edge += tokens * model.dim * (4 + 2 * r + (c if r != c else 0))  # final norm, head input
    else:
        edge += tokens * model.dim * r  # the stage output, kept until its backward
    activations, recompute = {}, {}
    for mode in ("none", "full", "selective"):
        kept = checkpointed_blocks(blocks, mode, model.ac_every)
        saved = sum(tokens * model.dim * r if i in kept else per_block for i in blocks)
        # interleaved_1f1b: a chunk in flight is one of this rank's virtual stages
        activations[mode] = int(in_flight * (saved + edge) / len(stage_layers))
        recompute[mode] = per_block if kept else 0

    logits, logits_grad = 0, 0
    if last:
        V = model.vocab_size
        logits = logits_in_flight * tokens * V * c
        logits_grad = tokens * V * c + loss_chunk_bytes(tokens * V)

    state = params + optimizer + outer  # what a snapshot or a checkpoint of this rank holds
    memory_tier = _memory_tier_on(cfg)
    snapshot = state * (2 if device == "cuda" else 1) if memory_tier else 0  # + pinned copy on a GPU
    staging = state if cfg.checkpoint.interval and cfg.checkpoint.async_ else 0
    holds = _describe_holds(blocks, first, last, cfg.parallel.pp)
    return RankPlan(ranks=[], holds=holds, params=params, weights_in_use=weights_in_use, grads=grads,
                    optimizer=optimizer, outer=outer, activations=activations, recompute=recompute, logits=logits,
                    logits_grad=logits_grad, snapshot_host=snapshot, staging_host=staging,
                    reserve=GPU_RUNTIME_RESERVE if device == "cuda" else 0)


def optimizer_states(cfg: DictConfig) -> int:
    """fp32 tensors the inner optimizer keeps per parameter: AdamW's two moments, SGD's momentum."""
    return {"adamw": 2, "sgd": 1 if cfg.optim.momentum else 0}[cfg.optim.name]


def diloco_copies(cfg: DictConfig) -> int:
    """fp32 copies of the parameters DiLoCo keeps with several islands (parallel/diloco.py):
    the global parameters, the outer momentum, int4's error feedback, the delayed update's
    starting point, and what an overlapping or delayed sync sent (parameters, with overlap)."""
    lo = cfg.diloco
    if lo.islands == 1:
        return 0
    between_steps = lo.overlap_steps > 0 or lo.delayed_update
    return (1 + (lo.outer_momentum > 0) + (lo.quantize == "int4") + lo.delayed_update + between_steps
            + (lo.overlap_steps > 0))


def _weights_in_use(cfg: DictConfig, mine: dict, fsdp: bool, mixed: bool) -> int:
    """Compute-dtype weights alive next to the fp32 masters.

    FSDP: the root unit (embeddings, final norm, head) stays gathered from forward through
    backward; blocks are gathered one at a time with the next one prefetched (under pp all
    blocks of the stage stay gathered: microbatches alternate forward and backward), plus one
    block's unsharded gradient before its reduce-scatter. Without FSDP under bf16, autocast
    keeps a bf16 cast of every matmul weight (the router scores in fp32) until backward."""
    par = cfg.parallel
    size = 2 if mixed else 4
    experts_outside_fsdp = par.ep > 1 and par.dp == par.ep
    if fsdp:
        def unit(n: str) -> bool:
            return not (experts_outside_fsdp and is_expert(n))
        root = sum(math.prod(s) for n, s in mine.items() if _layer_of(n) is None)
        per_block: dict[int, int] = {}
        for n, s in mine.items():
            if _layer_of(n) is not None and unit(n):
                rows = s[0] // par.ep if is_expert(n) else s[0]
                per_block[_layer_of(n)] = per_block.get(_layer_of(n), 0) + rows * math.prod(s[1:])
        sizes = sorted(per_block.values(), reverse=True)
        gathered = sum(sizes) if par.pp > 1 else sum(sizes[:2])
        total = size * (root + gathered + (sizes[0] if sizes else 0))
        if mixed and experts_outside_fsdp:
            total += 2 * sum(math.prod(s) // par.ep for n, s in mine.items() if is_expert(n))
        return total
    if not mixed:
        return 0
    cast = 0
    for n, s in mine.items():
        if len(s) >= 2 and not n.startswith("tok_embeddings") and ".router." not in n:
            cast += math.prod(s) // (par.ep if is_expert(n) else 1)
    return 2 * cast


def _in_flight(cfg: DictConfig, pp_rank: int, microbatches: int) -> tuple[float, int]:
    """(pipeline microbatches whose activations a rank holds at once, of those with logits).

    GPipe runs every forward before any backward; 1F1B holds pp - stage on a stage;
    interleaved 1F1B counts chunks (one virtual stage each): its warm-up of
    (v-1)·pp + 2·(pp-1-rank) forwards plus the one in progress."""
    par = cfg.parallel
    if par.pp == 1:
        return 1, 1
    if par.pp_schedule == "gpipe":
        return microbatches, microbatches
    if par.pp_schedule == "1f1b":
        return min(microbatches, par.pp - pp_rank), 1
    v = par.pp_virtual_stages
    return min(microbatches * v, (v - 1) * par.pp + 2 * (par.pp - 1 - pp_rank) + 1), 1


def checkpointed_blocks(blocks: list[int], mode: str, every: int) -> set[int]:
    """The blocks (by their index in the whole model) that recompute their forward."""
    from atoll.parallel.activation_checkpointing import recomputes

    return {i for i in blocks if recomputes(i, mode, every)}


def block_activation_bytes(cfg: DictConfig, tokens: int, c: int, r: int) -> int:
    """Bytes one transformer block keeps for backward for `tokens` tokens.

    c: bytes of the compute dtype (matmul outputs), r: bytes of the residual stream. Per
    token (D dim, h heads, F dense hidden, H expert hidden, K top-k, E experts):
    - each RMSNorm: its fp32 input (4D), the normalised x and its output (2·r·D);
    - a linear whose input is not in the compute dtype saves autocast's own cast (c·D);
    - attention: q, k, v after rotary (k, v repeated to every head), the attention output,
      the contiguous copy of it wo reads (5·c·D), and the log-sum-exp (4h);
    - dense SwiGLU: w1 and w3 outputs, silu and the product (4·c·F);
    - MoE: router probabilities (4E over every kind of expert), choices and gates (≈16K),
      then per routed row (K per token, an upper bound: rows dropped by capacity or routed
      to zero-computation experts do not run) the two up-projections (2·c·H)
      and the sort (16 + c) for the sorted/grouped_mm/triton kernels, or every
      intermediate (2·c·D + 4·c·H) for naive; expert parallelism adds the rows received
      and sent back (2·c·D); a shared expert adds a dense SwiGLU of H.
    """
    model, moe = cfg.model, cfg.model.moe
    from atoll.trainer.config import ffn_hidden

    D, h, K, E = model.dim, model.heads, moe.top_k, moe.num_experts
    cast = c * D if r != c else 0
    norm = D * (4 + 2 * r)
    attention = norm + 3 * cast + 5 * c * D + 4 * h
    if not E:
        ffn = norm + 2 * cast + 4 * c * ffn_hidden(model)
    else:
        H = moe.hidden or ffn_hidden(model)
        routed = E + moe.zero_experts + moe.copy_experts + moe.constant_experts
        router = (4 * D if r != 4 else 0) + 4 * routed + 16 * K + 4 + (5 * K if moe.capacity_factor else 0)
        if moe.kernel == "naive":
            rows = K * (2 * c * D + 4 * c * H + c + 16)
        else:
            rows = K * (2 * c * H + 16 + c)
        if cfg.parallel.ep > 1:
            rows += K * 2 * c * D
        shared = 2 * cast + 4 * c * H if moe.shared_expert else 0
        ffn = norm + router + rows + shared
    return tokens * (attention + ffn)


def loss_chunk_bytes(logits_numel: int) -> int:
    """The loss's working memory at its peak, in backward: one chunk's fp32 logits, their
    log-softmax and their gradient (trainer/loss.py recomputes them chunk by chunk)."""
    from atoll.trainer.loss import CHUNK_BYTES

    return 3 * min(4 * logits_numel, CHUNK_BYTES)


def _loss_note(dtype: str) -> str:
    return (f"{dtype} logits kept for the loss; in backward their gradient and one fp32 chunk of the "
            "chunked cross-entropy (its logits, log-softmax and gradient)")


def _memory_tier_on(cfg: DictConfig) -> bool:
    from atoll.trainer.config import memory_tier_on

    # A single local process has no store to put snapshots in.
    return memory_tier_on(cfg) and cfg.launch.backend != "local"


def _describe_holds(blocks: list[int], first: bool, last: bool, pp: int) -> str:
    if pp == 1:
        return "all layers"
    parts = [f"layers {_ranges(blocks)}"] + (["embeddings"] if first else []) + (["head"] if last else [])
    return ", ".join(parts)


def _ranges(ids: list[int]) -> str:
    ids, out, start = sorted(ids), [], None
    for i, value in enumerate(ids):
        if start is None:
            start = value
        if i + 1 == len(ids) or ids[i + 1] != value + 1:
            out.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return ",".join(out)


# --------------------------------------------------------------------------- dp_shard: auto


@dataclass(frozen=True)
class DpShardChoice:
    mode: str  # "fsdp" or "ddp"
    why: str  # for the run's first line and the dry run


def rank_memory_bytes(cfg: DictConfig, local_device_gb: Optional[float], local_ranks: int) -> tuple[int, str]:
    """(bytes one rank trains in, what they are): `launch.device_memory_gb`, else the GPU's
    own (`local_device_gb`, the caller's), else this machine's memory shared by the
    `local_ranks` processes on it."""
    if cfg.launch.device_memory_gb:
        return int(cfg.launch.device_memory_gb * GIB), "per device (launch.device_memory_gb)"
    if local_device_gb:
        return int(local_device_gb * GIB), "per GPU"
    return machine_memory_bytes() // max(1, local_ranks), f"host memory / {local_ranks} ranks"


def replicated_state_bytes(cfg: DictConfig) -> int:
    """What the busiest rank holds under DDP: fp32 weights, gradients, optimizer state and
    DiLoCo state, as the layout splits them (pipeline stages, experts over ep)."""
    plan = plan_memory(with_dp_shard(cfg, "ddp"), suggest=False)
    return max(r.params + r.grads + r.optimizer + r.outer for r in plan.ranks)


def choose_dp_shard(cfg: DictConfig, memory_bytes: int, where: str) -> DpShardChoice:
    """`parallel.dp_shard` as the run uses it: the recipe's fsdp or ddp, or for auto DDP
    while the replicated state is at most 1/DDP_MAX_STATE_SHARE of `memory_bytes`, else FSDP."""
    par = cfg.parallel
    if par.dp_shard != "auto":
        return DpShardChoice(par.dp_shard, "")
    if par.dp == 1:
        return DpShardChoice("ddp", "auto: dp=1, nothing to shard")
    state = replicated_state_bytes(cfg)
    small = state * DDP_MAX_STATE_SHARE <= memory_bytes
    return DpShardChoice("ddp" if small else "fsdp",
                         f"auto: replicated state {human(state)} {'≤' if small else '>'} 1/{DDP_MAX_STATE_SHARE} "
                         f"of {human(memory_bytes)} {where}")


def with_dp_shard(cfg: DictConfig, mode: str) -> DictConfig:
    changed = copy.deepcopy(cfg)
    changed.parallel.dp_shard = mode
    return changed


# --------------------------------------------------------------------------- object store


def full_state_bytes(cfg: DictConfig) -> int:
    """fp32 weights, optimizer and DiLoCo state of the whole model, once (what one island's
    snapshot holds)."""
    copies = 1 + optimizer_states(cfg) + diloco_copies(cfg)
    return copies * 4 * sum(math.prod(s) for s in _param_shapes(cfg).values())


def machine_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def object_store_bytes(cfg: DictConfig, machine_bytes: Optional[int] = None) -> int:
    """`launch.ray_object_store_mb: auto`: room for the memory tier's replicas of every
    island (the complete one and the one being written, each on memory_replicas keepers of
    other nodes: a node's own shards are in its /dev/shm slots) with headroom; at least OBJECT_STORE_FLOOR_MB, at most OBJECT_STORE_MAX_FRACTION of the
    machine. A number in the recipe is taken as it is."""
    from atoll.trainer.config import object_store_mb

    if object_store_mb(cfg) is not None:
        return object_store_mb(cfg) * 2**20
    cap = OBJECT_STORE_MAX_FRACTION * (machine_bytes or machine_memory_bytes())
    return int(max(OBJECT_STORE_FLOOR_MB * 2**20, min(snapshot_store_need(cfg), cap)))


def snapshot_store_need(cfg: DictConfig) -> int:
    """Bytes the memory tier's replicas take in the object store, headroom included."""
    if not _memory_tier_on(cfg):
        return 0
    return int(full_state_bytes(cfg) * cfg.diloco.islands * cfg.checkpoint.memory_replicas
               * OBJECT_STORE_GENERATIONS * OBJECT_STORE_HEADROOM)


# --------------------------------------------------------------------------- when it does not fit


def _suggestions(cfg: DictConfig, plan: MemoryPlan, gb: float) -> list[tuple[str, int]]:
    """Overrides that lower the largest rank's total, each with the total it would bring;
    those that fit first, then by total."""
    from atoll.trainer.config import RecipeError, build_recipe

    par, data = cfg.parallel, cfg.data
    candidates = []
    if plan.ac != "full":
        candidates.append(["model.activation_checkpointing=full"])
    if plan.compute == "fp32" and plan.device == "cuda":
        candidates.append(["model.dtype=bf16"])
    if data.micro_batch > 1:
        candidates.append([f"data.micro_batch={data.micro_batch // 2}", f"data.grad_accum={data.grad_accum * 2}"])
    if par.dp > 1 and par.dp_shard == "ddp":  # the recipe's, or what auto chose
        candidates.append(["parallel.dp_shard=fsdp"])
    candidates.append([f"parallel.dp={par.dp * 2}", f"data.grad_accum={max(1, data.grad_accum // 2)}"]
                      if data.grad_accum > 1 else [f"parallel.dp={par.dp * 2}"])
    if par.pp * 2 <= cfg.model.layers:
        candidates.append([f"parallel.pp={par.pp * 2}"])
    out = []
    for overrides in candidates:
        try:
            changed = build_recipe(OmegaConf.create(OmegaConf.to_container(cfg)),
                                   OmegaConf.from_dotlist(overrides))
        except RecipeError:
            continue
        total = plan_memory(changed, local_device_gb=gb, suggest=False).peak
        if total < plan.peak:
            out.append((" ".join(overrides), total))
    budget = plan.budget or 0
    return sorted(out, key=lambda item: (item[1] > budget, item[1]))


# --------------------------------------------------------------------------- printing


def human(nbytes: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{int(nbytes)} B"


def describe(plan: MemoryPlan) -> list[str]:
    """The plan as a table (one column per group of identical ranks), the verdict, and the
    keys to change; every line starts with '# ' so the dry run's output stays YAML."""
    where = (f"GPU, {plan.compute} compute" if plan.device == "cuda"
             else f"this CPU, {plan.compute} compute")
    lines = [f"memory plan per rank ({where}; micro-batch {plan.tokens} tokens; "
             f"model.activation_checkpointing={plan.ac}):"]
    ac_label = {"none": "AC none", "full": "AC full",
                "selective": f"AC selective, every {plan.ac_every}"}
    rows: list[tuple[str, list[str]]] = [("ranks", [_ranges(r.ranks) for r in plan.ranks])]
    if any(r.holds != "all layers" for r in plan.ranks):
        rows.append(("holds", [r.holds for r in plan.ranks]))

    def row(label: str, values) -> None:
        rows.append((label, [human(v) for v in values]))

    row("parameters (fp32 master)", [r.params for r in plan.ranks])
    row(f"weights in use ({plan.compute} copies)", [r.weights_in_use for r in plan.ranks])
    row("gradients (fp32)", [r.grads for r in plan.ranks])
    row("optimizer state (fp32)", [r.optimizer for r in plan.ranks])
    if any(r.outer for r in plan.ranks):
        row("DiLoCo outer state (fp32)", [r.outer for r in plan.ranks])
    for mode in ("none", "full", "selective"):
        mark = "  <- recipe" if mode == plan.ac else ""
        row(f"activations ({ac_label[mode]}){mark}", [r.activations[mode] + r.recompute[mode]
                                                      for r in plan.ranks])
    row("logits (see note)", [r.logits + r.logits_grad for r in plan.ranks])
    if plan.device == "cuda":
        row("CUDA context, NCCL, slack", [r.reserve for r in plan.ranks])
    row("total on the device", [r.device_total(plan.ac) for r in plan.ranks])
    row("host: memory snapshot", [r.snapshot_host for r in plan.ranks])
    row("host: checkpoint staging", [r.staging_host for r in plan.ranks])
    width = max(len(label) for label, _ in rows)
    col = max(len(v) for _, values in rows for v in values)
    lines += [f"  {label:<{width}}  " + "  ".join(f"{v:>{col}}" for v in values) for label, values in rows]
    lines.append(f"  logits: {plan.loss_note}; activations with AC include one block rebuilt in "
                 "backward, which the total counts only where it exceeds the logits (freed by then)")
    store = f"  object store of a cluster atoll starts (launch.ray_object_store_mb): {human(plan.object_store)}"
    if plan.object_store_need > plan.object_store:
        store += (f", less than the {human(plan.object_store_need)} the memory snapshots want (2 "
                  "generations × memory_replicas+1, headroom): Ray will spill them to disk; on a "
                  "bigger machine auto gives more (up to 40% of its memory)")
    lines.append(store)
    if plan.budget is None:
        lines.append("no verdict: no GPU here; set launch.device_memory_gb=N (GiB per GPU, e.g. 80) "
                     "to plan for a GPU and check the fit")
    elif plan.fits:
        lines.append(f"fits: {human(plan.peak)} of {human(plan.budget)} per device "
                     f"({100 * plan.peak / plan.budget:.0f}%)")
    else:
        lines.append(f"DOES NOT FIT: {human(plan.peak)} needed of {human(plan.budget)} per device")
        for overrides, total in plan.suggestions:
            verdict = "fits" if total <= plan.budget else "still too much"
            lines.append(f"  try {overrides}: {human(total)} ({verdict})")
    return ["# " + line for line in lines]
