"""A real DeepSpeed ZeRO engine on CPU/gloo for tests/test_deepspeed_universal.py.

    python ds_engine_script.py RESULT [--load UNIVERSAL_DIR] [--save CKPT_DIR --steps K] [--stage S]
                               [--eval-tokens TOKENS_PT]

Builds the tiny atoll model (fresh weights, seed 1) in a ZeRO engine with a
torch AdamW client optimizer; --load restores a universal checkpoint
(`load_universal`), --save then trains K steps and `engine.save_checkpoint`s.
Rank 0 saves RESULT = {"loaded": ..., "trained": ...}, each with the full
weights (module and fp32 master), Adam moments by parameter name, and the
step and hyper-parameters of each optimizer group; with --eval-tokens, also the
engine's own loss ("eval_loss") on those token windows [B, S+1] after training.
Runs as one process (env defaults) or under torch.distributed.run.
"""

from __future__ import annotations

import argparse
import os

import torch

from atoll.trainer.config import ModelConfig, MoEConfig
from atoll.trainer.model import Transformer

VOCAB = 256


def build_model(seed: int, experts: int = 0) -> Transformer:
    model = Transformer(ModelConfig(dim=32, layers=2, heads=2, vocab_size=VOCAB,
                                    moe=MoEConfig(num_experts=experts, top_k=2)))
    model.init_weights(seed)
    return model


def build_optimizer(model: torch.nn.Module, lr: float = 1e-2) -> torch.optim.AdamW:
    """Two groups like atoll's: matrices decayed, 1-D parameters not."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8)


def group_names(model: torch.nn.Module) -> list[list[str]]:
    named = list(model.named_parameters())
    return [[n for n, p in named if p.ndim >= 2], [n for n, p in named if p.ndim < 2]]


def loss_fn(model: torch.nn.Module, tokens_BS: torch.Tensor) -> torch.Tensor:
    logits_BSV, _ = model(tokens_BS[:, :-1])
    return torch.nn.functional.cross_entropy(logits_BSV.reshape(-1, VOCAB), tokens_BS[:, 1:].reshape(-1))


def snapshot(engine, optimizer) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    named = list(engine.module.named_parameters())
    return {
        "world_size": engine.world_size,
        "global_steps": engine.global_steps,
        "module": {n: p.detach().clone() for n, p in named},
        "buffers": {n: b.clone() for n, b in engine.module.state_dict().items() if n not in dict(named)},
        "fp32": {n: safe_get_full_fp32_param(p).clone() for n, p in named},
        "exp_avg": {n: safe_get_full_optimizer_state(p, "exp_avg").clone() for n, p in named},
        "exp_avg_sq": {n: safe_get_full_optimizer_state(p, "exp_avg_sq").clone() for n, p in named},
        # ZeRO keeps one flat fp32 partition per group; its optimizer state holds the step.
        "steps": [optimizer.optimizer.state[flat]["step"].item()
                  for flat in optimizer.single_partition_of_fp32_groups],
        "param_groups": [{k: g[k] for k in ("lr", "betas", "eps", "weight_decay")}
                         for g in optimizer.optimizer.param_groups],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("result")
    parser.add_argument("--load")
    parser.add_argument("--save")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--stage", type=int, default=1)
    parser.add_argument("--experts", type=int, default=0, help="MoE layers with this many experts")
    parser.add_argument("--eval-tokens", help="a torch.save'd [B, S+1] token tensor to compute the loss on")
    args = parser.parse_args()
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29511")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)

    import importlib

    import deepspeed

    # DeepSpeed JIT-compiles an optional shared-memory allreduce kernel on first
    # use (minutes on 2 cores); plain gloo is all these tiny engines need.
    # (`deepspeed.comm.torch` as an attribute is the torch package, hence import_module.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

    model = build_model(seed=1, experts=args.experts)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": args.stage}, "gradient_clipping": 1.0,
              "checkpoint": {"load_universal": True}}
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(model),
                                                   config=config, dist_init_required=True)
    result = {}
    if args.load:
        engine.load_checkpoint(args.load, load_optimizer_states=True, load_lr_scheduler_states=False)
        result["loaded"] = snapshot(engine, optimizer)
    if args.save:
        generator = torch.Generator().manual_seed(100 + engine.global_rank)
        for _ in range(args.steps):
            tokens_BS = torch.randint(0, VOCAB, (2, 17), generator=generator)
            engine.backward(loss_fn(engine, tokens_BS))
            engine.step()
        # ZeRO links each parameter to its moments after the first optimizer step,
        # before later groups have state; link again so every group can be read back.
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
        engine.save_checkpoint(args.save, tag=f"global_step{engine.global_steps}",
                               client_state={"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}})
        result["trained"] = snapshot(engine, optimizer)
        if args.eval_tokens:
            with torch.no_grad():
                tokens_BS = torch.load(args.eval_tokens, weights_only=True)
                result["trained"]["eval_loss"] = loss_fn(engine, tokens_BS).item()
    if engine.global_rank == 0:
        torch.save(result, args.result)
    deepspeed.comm.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
