"""The training entry function every worker process runs.

`train(recipe_dict)` is what the launcher calls, once per process, whichever
backend started it. It reads its rank from the environment, builds the
single-device model, lets `atoll.parallel` shard it, and runs the loop:
micro-batches with gradient accumulation, clipping, AdamW, schedule, eval and
metrics. It never asks who started it: what a launcher adds (a snapshot
store, a heartbeat, a stop request) arrives as a `RunControl`. The loop does
the training step and hands every other concern (disk checkpoints, memory
snapshots, metrics, heartbeat) to its step hooks.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from atoll.checkpoint.checkpointer import Checkpointer
from atoll.checkpoint.store import find_resumable, step_dir_name
from atoll.checkpoint.snapshot import MemorySnapshotter, restore_snapshot
from atoll.checkpoint.state import ModelOptimizerState, ValueState
from atoll.parallel.kernels import resolve as resolve_kernel
from atoll.parallel.kernels.tuning import use_config_file as use_kernel_config_file
from atoll.parallel.expert_parallel import (moe_layers, reduce_moe_load, sync_expert_grads, take_moe_load,
                                           take_sent_bytes, unpack_moe_load)
from atoll.parallel.grad_clip import clip_grad_norm
from atoll.parallel.data_parallel import dp_comm_bytes_per_step, gradient_sync, uses_fsdp
from atoll.parallel.materialize import materialize
from atoll.parallel.parallelize import parallelize
from atoll.parallel.precision import resolve_precision
from atoll.parallel.diloco import DiLoCo
from atoll.parallel.outer_group import OuterGroup
from atoll.parallel.pipeline import PipelineRunner, StageModule, split_model, stage_layers, stages_of_rank
from atoll.parallel.layout import Layout, ParallelMesh, ProcessEnv, device_for
from atoll.trainer.config import (DataConfig, OptimConfig, as_dataclass, ffn_hidden, memory_interval,
                                  memory_tier_on, model_config, recipe_from_dict, recipe_sha256, run_dir,
                                  to_dict)
from atoll.trainer.data import build_data, validation_sets
from atoll.trainer.guard import AnomalyGuard
from atoll.trainer.hooks import (DilocoHook, DiskCheckpointHook, HeartbeatHook, MemorySnapshotHook,
                                 MetricsHook, RunControl, StartupTimes, StepHook, StopAgreement)
from atoll.trainer.islands import (build_diloco, connect_islands, island_saves, island_snapshots,
                                  shared_memory_interval)
from atoll.trainer.loss import lm_loss
from atoll.trainer.metrics import MetricsLogger, record_event
from atoll.trainer.mfu import device_peak_tflops, model_flops_utilization
from atoll.trainer.model import Transformer, count_params
from atoll.trainer.moe import routing_summary
from atoll.trainer.optim import ScheduleState, build_optimizer, build_scheduler
from atoll.trainer.resume import rejoin_island, resume
from atoll.trainer.stragglers import describe, peer_report
from atoll.trainer.run_dir import check_run_dir, checkpoints_dir, data_cache_dir, prepare_run_dir, write_config


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss diverged); one line naming why."""


@dataclass
class StepResult:
    """Global values of one step (the same on every rank)."""

    loss: float
    aux_loss: float
    grad_norm: float
    skipped: bool = False  # an anomaly: no optimizer step was taken


def flops_per_token(model: Transformer, cfg: DictConfig, ffn_experts_per_token: Optional[float] = None) -> float:
    """Training FLOPs per token: 6·N_active (without embeddings) + attention.

    N_active counts the routed FFN experts that ran: `ffn_experts_per_token`, summed over
    the MoE layers (measured: zero-computation experts and drops cost nothing), or top_k
    per layer where not given.
    """
    active = count_params(model)["active_per_token"] - model.tok_embeddings.weight.numel()
    layers = moe_layers(model)
    if ffn_experts_per_token is not None:
        for _, moe in layers:
            per_expert = sum(p.numel() for p in moe.experts.parameters()) / moe.num_experts
            active += per_expert * (ffn_experts_per_token / len(layers) - min(moe.top_k, moe.num_experts))
    head_dim = cfg.model.dim // cfg.model.heads
    return 6 * active + 12 * cfg.model.layers * cfg.model.heads * head_dim * cfg.data.seq_len


def set_threads(cfg: DictConfig, env: ProcessEnv) -> None:
    threads = cfg.launch.threads_per_worker or max(1, (os.cpu_count() or 1) // env.local_world_size)
    torch.set_num_threads(threads)


class Trainer:
    """One process's share of a run: model part, optimizer, data, logger."""

    def __init__(self, cfg: DictConfig, env: Optional[ProcessEnv] = None,
                 control: Optional[RunControl] = None):
        self.mesh: Optional[ParallelMesh] = None
        self.outer: Optional[OuterGroup] = None
        self.diloco: Optional[DiLoCo] = None
        self.checkpointer: Optional[Checkpointer] = None
        self.snapshotter: Optional[MemorySnapshotter] = None
        self._snapshots_failing = False
        self.hooks: list[StepHook] = []
        self.control = control or RunControl()
        self.startup = StartupTimes()
        try:
            self._build(cfg, env)
        except BaseException:
            self.close()  # leave no process group or writer behind
            raise

    def _build(self, cfg: DictConfig, env: Optional[ProcessEnv]) -> None:
        self.cfg = cfg
        self.env = env or ProcessEnv.from_environ()
        self.device = device_for(self.env)
        self.layout = Layout.from_recipe(cfg, self.device, self.env.local_world_size)
        self.layout.check_world(self.env)
        check_run_dir(cfg, restarting=self.control.attempt > 0)
        set_threads(cfg, self.env)
        self.startup.lap("build")
        self.mesh = ParallelMesh(self.layout, self.env, self.device,
                                 timeout_s=cfg.fault_tolerance.collective_timeout_s)
        self.layout = self.mesh.layout  # dp_shard: auto as every rank resolved it
        self.startup.lap("rendezvous")
        self.env = self.mesh.env  # ranks inside this rank's island
        if self.layout.islands > 1:
            self.outer = connect_islands(cfg, self.mesh, joining=self.control.rejoin_token is not None)
        if self.env.is_logging_rank:
            prepare_run_dir(cfg, restarting=self.control.attempt > 0)
        self.mesh.barrier()
        if self.outer is not None and self.control.rejoin_token is None:
            # no island writes into the run directory before it is prepared
            self.outer.agree("started", "1", cfg.fault_tolerance.collective_timeout_s)
        self.is_logging_rank = self.env.is_logging_rank

        # Triton tiles chosen once per shape for all ranks, and again after a restart
        use_kernel_config_file(run_dir(cfg) / "kernels" / "triton_configs.json")
        self.precision = resolve_precision(cfg.model.dtype, self.device, fsdp=uses_fsdp(self.layout))
        self.precision.configure_backends()
        self.kernel_choice = ""
        if cfg.model.moe.num_experts:  # an unusable kernel is a recipe problem: say so now
            moe = cfg.model.moe
            microbatches = (cfg.parallel.microbatches or cfg.parallel.pp) if cfg.parallel.pp > 1 else 1
            rows = cfg.data.micro_batch // microbatches * cfg.data.seq_len * moe.top_k / moe.num_experts
            hidden = moe.hidden or ffn_hidden(cfg.model)
            chosen = resolve_kernel(moe.kernel, self.device,
                                    self.precision.compute_dtype,
                                    rows * cfg.model.dim * hidden)
            self.kernel_choice = f"MoE kernel {moe.kernel}" + \
                (f" -> {chosen} ({self.device.type}, {rows:g} rows of {cfg.model.dim}x{hidden} per expert)"
                 if moe.kernel == "auto" else "")
        self.zero = torch.zeros((), device=self.device)  # where a step's sums start, made once
        with torch.device("meta"):  # storage and values come once the model is sharded
            self.model = Transformer(model_config(cfg))
        self.flops_per_token = flops_per_token(self.model, cfg)  # at top_k FFN experts per token
        # FLOPs are linear in the FFN experts run: a log step counts those that ran
        self.flops_without_experts = flops_per_token(self.model, cfg, 0.0)
        self.flops_per_expert = flops_per_token(self.model, cfg, 1.0) - self.flops_without_experts
        self.peak_tflops = device_peak_tflops(self.device)  # None: no `mfu` in the metrics
        self.param_count = count_params(self.model)["total"]
        param_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self._build_parts(cfg)
        # reduce_moe_load's float64 buffer: every layer's load per expert and its drop count
        self.moe_modules = [(name, moe) for part in self.parts for name, moe in moe_layers(part)]
        self.params = [p for part in self.parts for p in part.parameters()]
        stats_bytes = sum(8 * (moe.kinds.total + 1) for _, moe in self.moe_modules)
        self.comm_bytes = dp_comm_bytes_per_step(param_bytes, self.layout, stats_bytes, self.precision)
        self.moe_load: list = []
        self.optim_cfg = as_dataclass(cfg.optim, OptimConfig)
        self.optimizers = [build_optimizer(part, self.optim_cfg) for part in self.parts]
        self.schedulers = [build_scheduler(opt, self.optim_cfg, cfg.run.steps) for opt in self.optimizers]

        data_cfg = as_dataclass(cfg.data, DataConfig)
        self.dataset, self.loader = build_data(data_cfg, cfg.run.seed, self.mesh.dp_rank,
                                               self.layout.dp, cfg.model.vocab_size,
                                               island=self.env.island, islands=self.layout.islands,
                                               cache_dir=data_cache_dir(cfg))
        # The validation set is `eval_batches` steps' worth of windows of the whole run (every
        # island's batch together), so every split of the same batch evaluates the same windows.
        eval_micro_batches = cfg.logging.eval_batches * cfg.data.grad_accum * self.layout.islands
        self.val = (validation_sets(self.dataset, data_cfg.micro_batch, eval_micro_batches,
                                    self.mesh.dp_rank, self.layout.dp)
                    if cfg.logging.eval_interval else [])
        self.step = 0
        self.tokens_per_step = self.loader.global_batch * cfg.data.seq_len

        ckpt = cfg.checkpoint
        self.checkpointer = Checkpointer(
            checkpoints_dir(cfg), is_coordinator=self.env.is_island_lead if self.outer else self.is_logging_rank,
            use_async=ckpt.async_, interval=ckpt.interval,
            keep=ckpt.keep, keep_every=ckpt.keep_every, layout=self.layout.to_dict(),
            recipe=to_dict(cfg), on_event=self._event, warn=self.warn,
            islands=island_saves(self.outer, cfg.fault_tolerance.collective_timeout_s) if self.outer else None,
            clean_partials=self.is_logging_rank and not self.control.rejoin_token)
        store = self.control.snapshot_store
        if store is not None and self.outer is not None:  # islands share the store, each in its own part
            store = island_snapshots(self.outer, store)
        self.snapshot_store = store
        if store is not None and memory_tier_on(cfg):
            self.snapshotter = MemorySnapshotter(store, rank=self.env.rank, world=self.env.world_size,
                                                 is_coordinator=self.env.is_island_lead,
                                                 interval=memory_interval(cfg), warn=self.warn,
                                                 on_event=self._snapshot_event,
                                                 agree_interval=(partial(shared_memory_interval, self.outer)
                                                                 if self.outer else None))
        self.progress = ValueState(step=0)
        self.last_step = min(cfg.run.steps, cfg.run.stop_at or cfg.run.steps)
        self.stop = StopAgreement(self.control)  # a clean stop the launcher asks for
        ft = cfg.fault_tolerance
        self.guard = AnomalyGuard(ft.spike_factor, ft.max_bad_steps)
        # Everything a checkpoint holds; each entry is layout-free.
        self.states = {"model_optim": ModelOptimizerState(list(zip(self.parts, self.optimizers))),
                       "scheduler": ScheduleState(self.schedulers), "data": self.loader,
                       "train": self.progress, "guard": self.guard}
        if self.outer is not None:
            self.diloco = build_diloco(cfg, self.parts, self.outer, self.mesh)
            self.states["diloco"] = self.diloco
        self.resumed_step: Optional[int] = None
        self.resume_source: Optional[str] = None
        self.startup.lap("build")
        self.resumed_from = rejoin_island(self) if self.control.rejoin_token else resume(self)
        self.startup.lap("restore")
        self.logger = MetricsLogger(run_dir(cfg), cfg.run.steps, start_step=self.step,
                                    enabled=self.is_logging_rank, wandb_mode=cfg.logging.wandb,
                                    recipe=to_dict(cfg), progress_bar=cfg.logging.progress,
                                    name=cfg.run.name,
                                    wandb_run_id=self.progress.values.get("wandb_run_id"))
        self.progress.values["wandb_run_id"] = self.mesh.broadcast_object(self.logger.wandb_run_id)
        if self.is_logging_rank and self.step < self.last_step:  # nothing to do: leave it as it was
            write_config(cfg)
        if self.resumed_from is not None:
            self.logger.event("resume", step=self.step, path=str(self.resumed_from),
                              source=self.resume_source, layout=self.layout.to_dict())
        if self.control.attempt == 0 and self.control.rejoin_token is None:  # once per invocation
            self.logger.event("run_start", recipe_sha256=recipe_sha256(cfg), layout=self.layout.to_dict(),
                              resume=None if self.resumed_from is None else
                              {"source": self.resume_source, "step": self.step, "path": str(self.resumed_from)})
        # Order matters: a step's metrics row is written before its snapshot can complete,
        # so a run resumed from that snapshot never lacks the row; the heartbeat comes last,
        # so a step counts as done only once its snapshot has started.
        self.hooks = ([DilocoHook()] if self.diloco else []) + [MetricsHook()] + \
            ([MemorySnapshotHook()] if self.snapshotter else []) + \
            [DiskCheckpointHook(), HeartbeatHook(self.control)]
        self.step_times = next(h.times for h in self.hooks if isinstance(h, HeartbeatHook))
        # Under torchrun no supervisor reads the heartbeat: the step's all-reduce carries the times.
        self.peers = peer_report(cfg.fault_tolerance, self.control.heartbeat is not None, self.env.rank,
                                 self.env.world_size, self.env.local_world_size, self.mesh.mesh)
        self.startup.lap("build")

    def _build_parts(self, cfg: DictConfig) -> None:
        """This rank's model parts, parallelised: the whole model, or its pipeline stages."""
        par = cfg.parallel
        self.runner: Optional[PipelineRunner] = None
        if self.layout.pp == 1:
            self.parts = [self.model]
            self.train_module = parallelize(self.model, self.mesh, cfg.model, self.precision,
                                            materialize=self._materialize)
            return
        virtual = par.pp_virtual_stages if par.pp_schedule == "interleaved_1f1b" else 1
        num_stages = self.layout.pp * virtual
        layers = stage_layers(cfg.model.layers, num_stages, par.pp_first_last_layers)
        stage_ids = stages_of_rank(self.mesh.pp_rank, self.layout.pp, virtual)
        self.parts = split_model(self.model, stage_ids, layers)
        del self.model  # each rank keeps only its stages
        wrappers, train_modules = [], []
        for part in self.parts:
            wrapper = StageModule(part, self.precision.forward_context)
            wrappers.append(wrapper)
            train_modules.append(parallelize(part, self.mesh, cfg.model, self.precision, root=wrapper,
                                             materialize=self._materialize))
        self.runner = PipelineRunner(train_modules, wrappers, stage_ids, num_stages, par.pp_schedule,
                                     par.microbatches or self.layout.pp, lm_loss, self.device,
                                     self.mesh.pp_group)

    def _materialize(self, part: torch.nn.Module) -> None:
        """A part built on the meta device, on this rank's device with its share of the
        initial values (the same values whatever the layout)."""
        materialize(part, self.device, self.cfg.run.seed)

    def warn(self, message: str) -> None:
        print(f"warning: {message}", flush=True)

    def checkpoint_skipped(self, path: Path, reason: str) -> None:
        self._event("checkpoint_skipped", path=str(path), reason=reason)

    def _snapshot_event(self, event: str, /, **fields) -> None:
        # One per step would drown the run's events: only the first failure of a streak.
        failing = event == "snapshot_failed"
        if failing and not self._snapshots_failing:
            self.island_event(event, **fields)
        self._snapshots_failing = failing

    def _event(self, event: str, /, **fields) -> None:
        if self.is_logging_rank:
            record_event(run_dir(self.cfg), event, **fields)

    def island_event(self, event: str, /, **fields) -> None:
        """An event every island reports for itself (DiLoCo): written by its first rank, naming
        the island when there are several."""
        if self.outer is not None:
            fields.setdefault("island", self.env.island)
        if self.env.is_island_lead:
            record_event(run_dir(self.cfg), event, **fields)

    def snapshot_extra(self) -> dict:
        return {"step": self.step, "samples": self.loader.samples_consumed,
                "layout": self.layout.to_dict()}

    def disk_checkpoint_due(self) -> bool:
        """A disk checkpoint is taken after this step: on the interval, at the last step of
        this invocation, at a clean stop (to resize) that has no memory snapshot to resume from,
        and always when a signal stops the run (a rerun continues from it)."""
        if self.stop.ends_run_at(self.step):
            return True
        boundary = self.step == self.last_step or (self.step == self.stop.after and self.snapshotter is None)
        interval = self.checkpointer.interval
        return bool(interval) and (self.step % interval == 0 or boundary)

    def at_boundary(self) -> bool:
        """The last step of this invocation: save whatever the next one resumes from."""
        return self.step == self.last_step or self.step == self.stop.after

    def to_device(self, host_tensor: torch.Tensor) -> torch.Tensor:
        """`host_tensor` on this rank's device. On CUDA it is copied from pinned memory
        without the host waiting: the copy is queued on the stream that will read it."""
        if self.device.type != "cuda":
            return host_tensor
        return host_tensor.pin_memory().to(self.device, non_blocking=True)

    def train_step(self) -> StepResult:
        """Forward, backward, checks and one optimizer step (skipped on an anomaly)."""
        micro_batches = self.loader.next_step()
        loss_sum = aux_sum = self.zero  # summed out of place: the zero is never written
        for index, (inputs_BS, targets_BS) in enumerate(micro_batches):
            inputs_BS, targets_BS = self.to_device(inputs_BS), self.to_device(targets_BS)
            if self.runner is not None:
                loss, aux_loss = self.runner.forward_backward(inputs_BS, targets_BS, len(micro_batches))
            else:
                with gradient_sync(self.train_module, index == len(micro_batches) - 1):
                    with self.precision.forward_context():
                        logits_BSV, aux_loss = self.train_module(inputs_BS)
                        loss = lm_loss(logits_BSV, targets_BS)
                    ((loss + aux_loss) / len(micro_batches)).backward()
            loss_sum = loss_sum + loss.detach()
            aux_sum = aux_sum + aux_loss.detach()
        for part in self.parts:
            sync_expert_grads(part, self.mesh)
        n = len(micro_batches)
        # Loss, aux loss and the stop requests ride on the gradient norm's all-reduce: every
        # rank gets the same global values, so every rank takes the same decision below.
        # Without pipeline stages that all-reduce spans the dp group, so the routing counts
        # ride on it too; stages hold different layers and reduce theirs over dp apart.
        shared = self.peers.slots(self.step_times.compute_s) if self.peers else []
        flags = self.to_device(torch.tensor([*self.stop.offer(), *shared], dtype=torch.float64))
        loads_ride = self.layout.pp == 1 and bool(self.moe_modules)
        extra = [loss_sum / n, aux_sum / n, flags] + ([take_moe_load(self.moe_modules)] if loads_ride else [])
        grad_norm, (loss_total, aux_total, stop, final_stop, *rest) = clip_grad_norm(
            self.params, self.optim_cfg.grad_clip, self.mesh.stage_world_size, extra=extra)
        computes, load_sums = rest[:len(shared)], rest[len(shared):]
        result = StepResult(loss=loss_total / self.layout.dp, aux_loss=aux_total / self.layout.dp,
                            grad_norm=grad_norm)
        self.stop.agree(self.step + 1, stop, final_stop)
        if self.peers and self.env.is_island_lead:
            for event, fields in self.peers.take(self.step, computes, time.time()):
                self.island_event(event, **fields)
                print(describe(event, fields, self.cfg.fault_tolerance.straggler_threshold), flush=True)
        if loads_ride:
            self.moe_load = unpack_moe_load(self.moe_modules, torch.tensor(load_sums, dtype=torch.float64,
                                                                           device=self.device))
        else:
            self.moe_load = [load for part in self.parts for load in reduce_moe_load(part, self.mesh)]
        anomaly = self.guard.check(result.loss, grad_norm)
        if anomaly is not None:
            self._anomaly(*anomaly, result)
            return result
        for hook in self.hooks:  # e.g. a snapshot still copying what the step below mutates
            hook.before_optimizer_step(self)
        for (_, load_E, _), (_, moe) in zip(self.moe_load, self.moe_modules):
            if moe.balance == "aux_free":
                moe.router.update_bias(load_E, moe.bias_update_rate, moe.target_share())
        for optimizer, scheduler in zip(self.optimizers, self.schedulers):
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.progress.values["step"] = self.step
        return result

    def _anomaly(self, kind: str, value: float, action: str, result: StepResult) -> None:
        """Drop the step's gradients; after too many in a row, roll back to the last good state."""
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        result.skipped = True
        self._event("anomaly", step=self.step + 1, kind=kind, value=str(value), action=action)
        self.warn(f"{kind} loss or gradient ({value}) at step {self.step + 1}: {action}")
        if action == "rollback":
            self._rollback()

    def _rollback(self) -> None:
        """Back to the newest snapshot or checkpoint; the data stream goes on past the bad batches."""
        position, from_step = self.loader.samples_consumed, self.step
        if self.outer is not None:
            raise TrainingError(f"the loss diverged at step {from_step + 1} on DiLoCo island "
                                f"{self.env.island}, and one island cannot roll back alone (its shared "
                                "state would leave the others'); lower optim.lr or check the data")
        if self.snapshotter is not None:
            self.snapshotter.wait()
        store = self.snapshot_store if self.snapshotter is not None else None
        memory_step = store.latest() if store is not None else None
        if memory_step is not None:
            restore_snapshot(store, memory_step, self.states, self.checkpointer.group)
        else:
            self.checkpointer.wait()
            found = find_resumable(checkpoints_dir(self.cfg), self.warn)
            if found is None:
                raise TrainingError(f"the loss diverged at step {from_step + 1} and there is no "
                                    "snapshot or checkpoint to roll back to; lower optim.lr or "
                                    "check the data")
            self.checkpointer.load(found[0], found[1], self.states)
        self.step = int(self.progress.values["step"])
        skipped = position - self.loader.samples_consumed
        self.loader.samples_consumed = position  # skip the offending batches, never replay them
        self._event("rollback", from_step=from_step, to_step=self.step, skipped_samples=skipped)
        self.warn(f"rolled back from step {from_step} to step {self.step}, "
                   f"skipping {skipped} samples")

    def load_metrics(self) -> dict:
        """Per MoE layer, in the last step: max and mean assignments per FFN expert, dropped
        ones, FFN experts run per token, and each kind's share with zero-computation experts."""
        metrics = {}
        for (name, load_E, dropped), (_, moe) in zip(self.moe_load, self.moe_modules):
            layer = name.split("layers.")[1].split(".")[0]  # "[part.]layers.<i>.feed_forward"
            for key, value in routing_summary(moe.kinds, moe.top_k, load_E, dropped).items():
                metrics[f"moe.{layer}.{key}"] = value
        if self.layout.pp > 1:  # each stage knows its own layers: gather them
            gathered = [None] * self.layout.pp
            dist.all_gather_object(gathered, metrics, group=self.mesh.pp_group)
            metrics = {k: v for stage in gathered for k, v in stage.items()}
        return metrics

    def step_metrics(self, result: StepResult, steps: int, elapsed: float) -> dict:
        """The metrics.jsonl row of a log step (`steps` steps took `elapsed` seconds)."""
        tokens_per_s = self.tokens_per_step * steps / elapsed
        load_metrics = self.load_metrics()
        if self.moe_modules:  # the FLOPs the step did: the FFN experts that ran
            self.flops_per_token = self.flops_without_experts + self.flops_per_expert * sum(
                value for key, value in load_metrics.items() if key.endswith(".ffn_experts_per_token"))
        metrics = {"loss": result.loss, "aux_loss": result.aux_loss,
                   "lr": self.schedulers[0].get_last_lr()[0], "grad_norm": result.grad_norm,
                   "tokens": self.step * self.tokens_per_step,
                   "samples": self.loader.samples_consumed, "tokens_per_s": tokens_per_s,
                   # every island's samples: they take turns along one global stream
                   **{f"samples.{name}": count for name, count in self.dataset.samples_by_source(
                       self.loader.samples_consumed * self.layout.islands).items()},
                   "step_time_s": elapsed / steps, "data_s": self.loader.take_busy_s() / steps,
                   "ckpt_block_s": self.checkpointer.take_blocked_s(),
                   "tflops": self.flops_per_token * tokens_per_s / 1e12}
        if self.peak_tflops:  # tflops: the island's GPUs together (its global batch's tokens)
            metrics["mfu"] = model_flops_utilization(metrics["tflops"], self.env.world_size, self.peak_tflops)
        metrics["comm_bytes"] = self.comm_bytes * steps + (self.outer.take_bytes() if self.outer else 0) + \
            sum(take_sent_bytes(part) for part in self.parts)  # expert parallel: measured
        metrics.update(load_metrics)
        return metrics

    def one_step(self) -> StepResult:
        """A training step, then every hook that follows one."""
        result = self.train_step()
        if not result.skipped:
            for hook in self.hooks:
                hook.after_step(self, result)
        return result

    def run(self) -> dict:
        cfg = self.cfg
        if self.env.is_logging_rank:
            print(f"training {cfg.run.name}: {self.layout.describe()}, "
                  f"{self.param_count:,} parameters, {cfg.run.steps} steps"
                  + (f", {self.kernel_choice}" if self.kernel_choice else ""), flush=True)
        for hook in self.hooks:
            if isinstance(hook, HeartbeatHook):
                hook.started(self)  # started (and resumed): the launcher may time the next step
        if self.step >= self.last_step:
            saving = self.resume_source == "memory" and bool(self.checkpointer.interval)
            if saving:
                # Resumed from memory at the end: the end's disk checkpoint may never have committed.
                self.checkpointer.save(self.step, self.states, self.loader.samples_consumed)
            if self.is_logging_rank:
                print(f"saving the memory snapshot of step {self.step} as a disk checkpoint" if saving else
                      f"nothing to do: run {cfg.run.name} is already at step {self.step} "
                      f"(run.steps={cfg.run.steps}, run.stop_at={cfg.run.stop_at})", flush=True)
            self._close_hooks()
            self.logger.close(self.step, summary=False)
            return {"step": self.step}
        while self.step < self.last_step and self.step != self.stop.after:
            self.one_step()
        self._close_hooks()
        stopped = self.step == self.stop.after and self.step < self.last_step
        self.logger.close(self.step, summary=not stopped)
        last = next((h.last for h in self.hooks if isinstance(h, MetricsHook)), {})
        if self.stop.ends_run_at(self.step):
            return {"step": self.step, "stopped": True, **last, "stop": self._stop_summary()}
        if self.checkpointer.interval and self.checkpointer.last_error:
            raise TrainingError(f"the run finished but its last {self.checkpointer.last_error}")
        return {"step": self.step, "stopped": stopped, **last}

    def _stop_summary(self) -> dict:
        """What a signal's stop left: the step and the checkpoint a rerun continues from."""
        saved = checkpoints_dir(self.cfg) / step_dir_name(self.step)
        failed = self.checkpointer.last_error
        return {"signal": self.stop.reason, "step": self.step,
                "checkpoint": None if failed or not saved.is_dir() else str(saved), "error": failed}

    def _close_hooks(self) -> None:
        for hook in self.hooks:
            hook.close(self, clean=True)
        self.checkpointer.close()

    def close(self, clean: bool = False) -> None:
        """Release everything without collectives: `run` closes cleanly, this is the error path
        (`clean`: `run` returned, so every collective it began has completed on its peers too)."""
        for hook in self.hooks:
            try:
                hook.close(self, clean=False)
            except Exception as exc:  # closing must not hide the error that got us here
                print(f"warning: closing {type(hook).__name__} failed: {exc}", flush=True)
        self.hooks = []
        if self.checkpointer is not None:
            try:
                self.checkpointer.close(wait_for_peers=False)
            except Exception as exc:  # closing must not hide the error that got us here
                print(f"warning: closing the checkpointer failed: {exc}", flush=True)
            self.checkpointer = None
        if self.outer is not None:
            self.outer.close()
            self.outer = None
        if self.mesh is not None:
            self.mesh.close(clean=clean)  # else NCCL is aborted: a dead peer would hang a destroy
            self.mesh = None


def train(recipe: dict, control: Optional[RunControl] = None) -> dict:
    """Entry function: run the recipe as this process's rank; returns final metrics."""
    cfg = recipe_from_dict(recipe)
    trainer = Trainer(cfg, control=control)
    result = None
    try:
        result = trainer.run()
        return result
    finally:
        trainer.close(clean=result is not None)
