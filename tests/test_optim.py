"""AdamW takes torch's fused kernel also for DTensor parameters, with foreach's results.

The model is sharded with FSDP2 (every parameter a DTensor) on a one-rank
gloo mesh; `build_optimizer` must choose the fused implementation, and three
steps on real gradients must leave the weights and both moments within 1e-6
of the foreach implementation that DTensors used before.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from atoll.trainer.config import ModelConfig, MoEConfig, OptimConfig
from atoll.trainer.model import Transformer
from atoll.trainer.optim import build_optimizer


def sharded_model(mesh) -> Transformer:
    model = Transformer(ModelConfig(dim=32, layers=2, heads=2, vocab_size=64,
                                    moe=MoEConfig(num_experts=4, top_k=2)))
    model.init_weights(0)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def test_fused_adamw_on_dtensors_matches_foreach(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
        fused_model, foreach_model = sharded_model(mesh), sharded_model(mesh)
        assert all(isinstance(p, DTensor) for p in fused_model.parameters())
        fused = build_optimizer(fused_model, cfg)
        assert fused.defaults["fused"]
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]}
                  for g in build_optimizer(foreach_model, cfg).param_groups]
        foreach = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)
        assert [g["weight_decay"] for g in foreach.param_groups] == [g["weight_decay"] for g in fused.param_groups]
        assert not any(g["fused"] for g in foreach.param_groups)
        tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
        for _ in range(3):
            for model, optimizer in ((fused_model, fused), (foreach_model, foreach)):
                logits, aux = model(tokens)
                (logits.float().square().mean() + aux).backward()
                optimizer.step()
                optimizer.zero_grad()
        for (name, a), b in zip(fused_model.named_parameters(), foreach_model.parameters()):
            torch.testing.assert_close(a.full_tensor(), b.full_tensor(), rtol=1e-6, atol=1e-6, msg=name)
            for moment in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(fused.state[a][moment].full_tensor(),
                                           foreach.state[b][moment].full_tensor(), rtol=1e-6, atol=1e-9,
                                           msg=f"{name} {moment}")
    finally:
        dist.destroy_process_group()
