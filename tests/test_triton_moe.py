"""The Triton MoE kernel against experts_naive: outputs and every gradient.

Without CUDA the kernels run on Triton's CPU interpreter (fp32 only, slow:
tiny shapes). TRITON_INTERPRET must be set before the kernel module is
imported (triton.jit reads it when the kernels are decorated); tests/conftest.py
sets it before anything imports triton.
"""

import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # also set first thing by conftest.py

import pytest  # noqa: E402

from atoll.parallel.kernels.triton_moe import (  # noqa: E402
    experts_triton, moe_experts, moe_experts_backward)
from atoll.trainer.moe import GroupedExperts, experts_naive  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# GPU checks: deselected on machines without CUDA (tests/conftest.py).
cuda_only = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _exact_fp32():
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = tf32


def make_inputs(T, D, H, E, K, empty=(), skew=0.0, dtype=torch.float32, seed=0):
    """Routed inputs; experts in `empty` get no token, `skew` > 0 makes loads uneven."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    logits = torch.randn(T, E, generator=g) + skew * torch.arange(E, dtype=torch.float32)
    logits[:, list(empty)] = -1e9
    gates, experts = logits.softmax(-1).topk(K, dim=-1)
    ws = [torch.randn(E, D, H, generator=g) * D ** -0.5,
          torch.randn(E, D, H, generator=g) * D ** -0.5,
          torch.randn(E, H, D, generator=g) * H ** -0.5]
    leaves = [t.to(DEVICE, dtype).requires_grad_() for t in (x, *ws)]
    gates = gates.to(DEVICE).requires_grad_()
    return leaves[0], gates, experts.to(DEVICE), *leaves[1:]


def forward_backward(fn, x, gates, experts, w1, w3, w2, dy):
    out = fn(x, gates, experts, w1, w3, w2)
    grads = torch.autograd.grad(out, (x, gates, w1, w3, w2), dy)
    return out, grads


def check_against_naive(T, D, H, E, K, rtol=1e-4, atol=1e-4, **kw):
    inputs = make_inputs(T, D, H, E, K, **kw)
    dy = torch.randn(T, D, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out, grads = forward_backward(experts_triton, *inputs, dy)
    ref, ref_grads = forward_backward(experts_naive, *inputs, dy)
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    for name, got, want in zip(("x", "gates", "w1", "w3", "w2"), grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"d{name}: {m}")
    return inputs


def test_top2_with_an_empty_expert():
    x, gates, experts, *_ = check_against_naive(T=37, D=16, H=32, E=4, K=2, empty=(2,))
    assert not (experts == 2).any()


def test_top1():
    check_against_naive(T=37, D=16, H=32, E=4, K=1)


def test_top3_uneven_loads_and_ragged_dims():
    # D, H not multiples of the block; expert 7 takes most rows (several tiles)
    x, gates, experts, *_ = check_against_naive(T=29, D=24, H=40, E=8, K=3, skew=0.6)
    loads = torch.bincount(experts.flatten(), minlength=8)
    assert loads.max() > 2 * loads.float().mean()


def test_single_token_and_no_tokens():
    check_against_naive(T=1, D=16, H=32, E=4, K=2)
    x, gates, experts, w1, w3, w2 = make_inputs(0, 16, 16, 2, 1)  # an EP rank that got nothing
    out = experts_triton(x, gates, experts, w1, w3, w2)
    out.sum().backward()
    assert out.shape == (0, 16) and w1.grad.abs().sum() == 0 and x.grad.shape == (0, 16)


def test_skipped_assignments_run_nothing_and_get_no_gradient():
    """Id E (a zero-computation expert or a drop): naive with those gates zeroed, a zero gate
    gradient, and tokens whose every slot is skipped get nothing."""
    T, D, H, E, K = 29, 16, 32, 4, 2
    x, gates, experts, w1, w3, w2 = make_inputs(T, D, H, E, K, empty=(1,), seed=2)
    skipped = torch.rand(T, K, generator=torch.Generator().manual_seed(3)).to(DEVICE) < 0.4
    skipped[:3] = True
    dy = torch.randn(T, D, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out, grads = forward_backward(experts_triton, x, gates, experts.masked_fill(skipped, E), w1, w3, w2, dy)
    naive_out = experts_naive(x, gates * ~skipped, experts, w1, w3, w2)
    ref_grads = torch.autograd.grad(naive_out, (x, gates, w1, w3, w2), dy)
    torch.testing.assert_close(out, naive_out, rtol=1e-4, atol=1e-4)
    for name, got, want in zip(("x", "gates", "w1", "w3", "w2"), grads, ref_grads):
        if name == "gates":
            got, want = got[~skipped], want[~skipped]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"d{name}: {m}")
    assert not grads[1][skipped].any() and not out[:3].any()


def test_grouped_experts_module_through_the_registry():
    torch.manual_seed(0)
    fused = GroupedExperts(4, 16, 32, kernel="triton").to(DEVICE)
    naive = GroupedExperts(4, 16, 32, kernel="naive").to(DEVICE)
    naive.load_state_dict(fused.state_dict())
    x, gates, experts, *_ = make_inputs(T=20, D=16, H=32, E=4, K=2)
    outs, grads = [], []
    for module in (fused, naive):
        out = module(x, gates, experts)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), (x, *module.parameters())))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_opcheck():
    x, gates, experts, w1, w3, w2 = make_inputs(T=6, D=16, H=16, E=2, K=1)
    # test_aot_dispatch_dynamic on the forward op takes ~20 s under the interpreter;
    # test_compiles_fullgraph covers the same tracing there
    quick = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(moe_experts, (x, gates, experts, w1, w3, w2),
                          test_utils=None if torch.cuda.is_available() else quick)
    with torch.no_grad():
        out, a, b = moe_experts(x, gates, experts, w1, w3, w2)
        args = [t.detach() for t in (torch.randn_like(out), x, gates, experts, w1, w3, w2, a, b)]
    torch.library.opcheck(moe_experts_backward, tuple(args))


def test_compiles_fullgraph():
    # aot_eager traces the op's fake and autograd registrations like inductor does
    backend = "inductor" if torch.cuda.is_available() else "aot_eager"
    inputs = make_inputs(T=12, D=16, H=16, E=2, K=2)
    dy = torch.randn(12, 16).to(DEVICE)

    def layer(x, gates, experts, w1, w3, w2):
        return torch.tanh(experts_triton(x * 2, gates, experts, w1, w3, w2))

    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    out, grads = forward_backward(compiled, *inputs, dy)
    ref, ref_grads = forward_backward(layer, *inputs, dy)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def rel_err(got, want):
    return ((got.float() - want).norm() / want.norm().clamp_min(1e-12)).item()


def test_autocast_casts_like_naive():
    # the trainer runs fp32 parameters under autocast; fp16 on CPU (the interpreter can't bf16)
    dtype, tol = (torch.bfloat16, 2e-2) if torch.cuda.is_available() else (torch.float16, 5e-3)
    x, gates, experts, w1, w3, w2 = make_inputs(T=20, D=16, H=32, E=4, K=2)
    with torch.autocast(DEVICE, dtype=dtype):
        out = experts_triton(x, gates, experts, w1, w3, w2)
    grads = torch.autograd.grad(out.sum(), (x, gates, w1, w3, w2))
    ref = experts_naive(x, gates, experts, w1, w3, w2)
    ref_grads = torch.autograd.grad(ref.sum(), (x, gates, w1, w3, w2))
    assert out.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    assert rel_err(out, ref) < tol
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < tol


@cuda_only
@pytest.mark.parametrize("T,D,H,E,K", [(300, 200, 328, 8, 2), (1000, 512, 1024, 16, 4)])
def test_bf16_close_to_fp32_naive(T, D, H, E, K):
    inputs = make_inputs(T, D, H, E, K, empty=(3,), skew=0.1, dtype=torch.bfloat16)
    dy = torch.randn(T, D, device=DEVICE)
    out, grads = forward_backward(experts_triton, *inputs, dy.bfloat16())
    ref_inputs = [t.detach().float().requires_grad_() if t.is_floating_point() else t
                  for t in inputs]
    ref, ref_grads = forward_backward(experts_naive, *ref_inputs, dy)
    assert out.dtype == torch.bfloat16 and grads[0].dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-2
    for name, got, want in zip(("x", "gates", "w1", "w3", "w2"), grads, ref_grads):
        assert rel_err(got, want) < 2e-2, name
    assert grads[2][3].abs().sum() == 0  # the empty expert's weight gradient


def test_tile_configs_are_chosen_once_and_kept_in_the_run_directory(tmp_path):
    """The trainer keeps the configs in <run dir>/kernels/triton_configs.json. The first run
    chooses one per kernel and shape and writes them; a second run (a restart) reads them all,
    chooses none itself, leaves the file as it was and gives bitwise the same results."""
    from atoll.parallel.kernels import tuning
    from atoll.trainer.config import load_recipe
    from atoll.trainer.train import Trainer
    from conftest import TINY_MOE

    cfg = load_recipe(None, [*TINY_MOE, "parallel.dp=1", "launch.backend=local", "checkpoint.interval=0",
                             "checkpoint.memory_interval=0", f"run.dir={tmp_path / 'run'}"])
    Trainer(cfg).close()
    path = tmp_path / "run" / "kernels" / "triton_configs.json"
    assert tuning.table().path == path and not path.exists()  # nothing chosen yet
    inputs = make_inputs(T=20, D=16, H=32, E=4, K=2)
    dy = torch.randn(20, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    try:
        first = forward_backward(experts_triton, *inputs, dy)
        assert (tuning.table().tuned, tuning.table().read) == (6, 0)  # 2 kernels forward, 4 backward
        saved = path.read_bytes()
        keys = sorted(json.loads(saved)["configs"])
        assert len(keys) == 6 and all("rows/expert<=16" in k for k in keys), keys  # 40 rows / 4 experts

        tuning.use_config_file(path)  # a restart: nothing in memory, the same file
        second = forward_backward(experts_triton, *inputs, dy)
        assert (tuning.table().tuned, tuning.table().read) == (0, 6)
        assert path.read_bytes() == saved
        assert torch.equal(first[0], second[0])
        assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))
    finally:
        tuning.use_config_file(None)
