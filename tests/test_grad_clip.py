"""Global gradient-norm clipping (atoll.parallel.grad_clip) against plain definitions.

On one process it must be torch's `clip_grad_norm_`. On a pp=2 × dp=2 × ep=2
mesh, with the model split, sharded and wrapped exactly as training does it
(FSDP and DDP), the norm must be that of the whole model's gradient gathered
in one place, and every clipped piece that gradient times the same factor.
"""

from __future__ import annotations

import os
import traceback
import zlib

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from atoll.parallel.grad_clip import clip_grad_norm
from atoll.trainer.config import ModelConfig, MoEConfig
from atoll.trainer.model import Transformer
from conftest import RESULT_TIMEOUT_S, spawned

MESH_WORLD = 4  # pp=2 × dp=2, ep=2 inside dp


def random_grads(shapes, scale: float, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * scale for shape in shapes]


@pytest.mark.parametrize("max_norm", [0.5, 1e3], ids=["clipped", "below-the-limit"])
def test_one_process_equals_torch_clip_grad_norm(max_norm):
    """Norm, clipped gradients and the riding scalars of one process are torch's (a parameter
    without a gradient is skipped by both)."""
    shapes = [(7, 5), (5,), (3, 4, 6), (1,)]
    ours = [torch.zeros(shape, requires_grad=True) for shape in shapes]
    theirs = [torch.zeros(shape, requires_grad=True) for shape in shapes]
    for a, b, grad in zip(ours, theirs, random_grads(shapes, 0.3, seed=0)):
        a.grad, b.grad = grad.clone(), grad.clone()
    ours.append(torch.zeros(3, requires_grad=True))  # no gradient at all
    norm, extra = clip_grad_norm(ours, max_norm, extra=[torch.tensor(2.5), torch.tensor(-1.0)])
    want = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert norm == pytest.approx(want.item(), rel=1e-6)
    assert (norm > max_norm) == (max_norm == 0.5)  # the first case really clips
    assert extra == [2.5, -1.0]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
    assert ours[-1].grad is None


def mesh_model() -> Transformer:
    model = Transformer(ModelConfig(dim=32, layers=4, heads=2, vocab_size=64,
                                    moe=MoEConfig(num_experts=4, top_k=2)))
    model.init_weights(0)
    return model


def full_gradient(name: str, shape) -> torch.Tensor:
    """The whole model's gradient of parameter `name`, the same on every rank."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(shape, generator=g)


def _clip_on_mesh(rank: int, store_file: str, results) -> None:
    """One rank: the model split into 2 stages, experts over ep=2, dense weights under FSDP
    (and, as a second model, DDP); every gradient set to its rank's piece of `full_gradient`,
    then clipped; sends back the norm and every clipped gradient gathered whole again."""
    from atoll.parallel.data_parallel import apply_data_parallel
    from atoll.parallel.expert_parallel import apply_expert_parallel
    from atoll.parallel.layout import Layout, ParallelMesh, ProcessEnv
    from atoll.parallel.pipeline import StageModule, split_model, stage_layers, stages_of_rank

    try:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=MESH_WORLD)
        out = {}
        for dp_shard in ("fsdp", "ddp"):
            layout = Layout(pp=2, dp=2, ep=2, dp_shard=dp_shard)
            mesh = ParallelMesh(layout, ProcessEnv(rank=rank, world_size=MESH_WORLD), torch.device("cpu"))
            parts = split_model(mesh_model(), stages_of_rank(mesh.pp_rank, 2, 1), stage_layers(4, 2))
            for part in parts:
                apply_expert_parallel(part, mesh)
                apply_data_parallel(StageModule(part), part.layers.values(), mesh)
            named = [(n, p) for part in parts for n, p in part.named_parameters()]
            kinds = set()
            for name, param in named:
                full = full_gradient(name, param.shape)
                if isinstance(param, DTensor):
                    kinds.add(f"{param.device_mesh.mesh_dim_names}: {param.placements}")
                    param.grad = distribute_tensor(full, param.device_mesh, param.placements)
                else:
                    kinds.add("replicated")
                    param.grad = full
            norm, (rank_sum,) = clip_grad_norm([p for _, p in named], 1.0, mesh.stage_world_size,
                                               extra=[torch.tensor(float(rank))])
            clipped = {name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).numpy().copy()
                       for name, p in named}
            out[dp_shard] = (norm, rank_sum, clipped, sorted(map(str, kinds)))
            dist.barrier()
        results.put((rank, out))
        dist.destroy_process_group()
    except Exception:
        results.put((rank, traceback.format_exc()))


@pytest.mark.slow
def test_norm_on_pp2_dp2_ep2_mesh_is_the_norm_of_the_gathered_gradient(tmp_path):
    """pp=2 × dp=2 × ep=2 (FSDP and DDP): every rank gets the norm of the whole model's
    gradient (each stage's dense shards, replicas and expert shards counted exactly once),
    the sum of the riding scalars over the world, and its gradients scaled by
    max_norm / (norm + 1e-6), which gathered are the whole gradient times that factor."""
    with spawned() as (start, results):
        for rank in range(MESH_WORLD):
            start(_clip_on_mesh, rank, str(tmp_path / "store"))
        got = dict(results.get(timeout=RESULT_TIMEOUT_S) for _ in range(MESH_WORLD))
    for rank, value in got.items():
        assert not isinstance(value, str), f"rank {rank}:\n{value}"
    whole = {name: full_gradient(name, p.shape).double() for name, p in mesh_model().named_parameters()}
    norm = sum(g.pow(2).sum() for g in whole.values()).sqrt().item()
    assert norm > 1.0  # so the limit of 1.0 clips
    factor = 1.0 / (norm + 1e-6)
    for dp_shard in ("fsdp", "ddp"):
        seen = set()
        for rank in range(MESH_WORLD):
            rank_norm, rank_sum, clipped, kinds = got[rank][dp_shard]
            assert rank_norm == pytest.approx(norm, rel=1e-6), (dp_shard, rank)
            assert rank_sum == 0 + 1 + 2 + 3
            for name, value in clipped.items():
                np.testing.assert_allclose(value, (whole[name] * factor).numpy(), rtol=1e-6, atol=1e-9,
                                           err_msg=f"{dp_shard} rank {rank} {name}")
            seen |= set(clipped)
            # Not vacuous: experts are ep shards in both, dense weights FSDP shards or replicas.
            assert kinds == (["('dp',): (Shard(dim=0),)", "('ep',): (Shard(dim=0),)"] if dp_shard == "fsdp"
                             else ["('ep',): (Shard(dim=0),)", "replicated"]), kinds
        assert seen == set(whole)  # the two stages together hold the whole model
