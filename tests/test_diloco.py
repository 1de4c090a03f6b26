"""DiLoCo: encodings, the outer step against a hand-written loop, and islands end to end.

The outer step runs on real gloo groups between spawned processes (one per
island) and is compared with a naive single-process loop that simulates the
islands one after the other with torch's own SGD as the outer optimizer.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback

import numpy as np

import pytest
import torch
import torch.distributed as dist
from torch import nn

from atoll.parallel.diloco import DiLoCo
from atoll.parallel.outer_group import OuterGroup
from atoll.parallel.pseudo_grad_codecs import Bf16Codec, Codec, Int4Codec, Int8Codec, make_codec
from atoll.trainer.metrics import read_jsonl
import signal

from atoll.checkpoint.checkpointer import island_dir
from atoll.checkpoint.dcp_io import read_tensors
from atoll.checkpoint.manifest import verify
from atoll.checkpoint.store import resolve_checkpoint
from conftest import (RESULT_TIMEOUT_S, TINY_MOE, ended, events, final_state, finish, free_port, grad_norms, last_step,
                      losses, run_cli, spawned, start_ray_run, start_torchrun, torchrun_ranks, wait_for)

INNER_STEPS, OUTER_STEPS = 3, 2


# ------------------------------------------------------------------ encodings

@pytest.mark.parametrize("codec, bound", [(Bf16Codec(), None), (Int8Codec(row=16), 127), (Int4Codec(16), 7)])
def test_codec_round_trip_error_is_within_one_step(codec, bound):
    x = torch.randn(1000) * torch.logspace(-4, 0, 1000)
    payload = codec.encode(x)
    assert payload.dtype == torch.uint8
    y = codec.decode(payload, x.numel())
    if bound is None:
        torch.testing.assert_close(y, x, rtol=2 ** -8, atol=0)
        return
    width = codec.row if hasattr(codec, "row") else codec.group
    padded = torch.cat([x, x.new_zeros((-x.numel()) % width)]).view(-1, width)
    step = (padded.abs().amax(dim=1, keepdim=True) / bound).expand_as(padded).flatten()[:x.numel()]
    assert ((y - x).abs() <= step * 0.51 + 1e-12).all()


def test_wire_sizes():
    x = torch.randn(64 * 100 + 3)
    assert make_codec("none").encode(x).numel() == 4 * x.numel()
    assert Bf16Codec().encode(x).numel() == 2 * x.numel()
    assert Int8Codec(row=512).encode(x).numel() == x.numel() + 4 * 13
    assert Int4Codec(64).encode(x).numel() == (x.numel() + 1) // 2 + 2 * 101


# ------------------------------------------------------------------ outer step on real gloo

def _batches(island: int, step: int):
    gen = torch.Generator().manual_seed(1000 * island + step)
    return torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)


class _SelectionBias(nn.Module):
    """A buffer added to the output, standing for the router's aux-free expert bias: not a
    parameter, moved by each island's own batches (`bias_rate`), averaged at outer steps."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("expert_bias_E", torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.expert_bias_E


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3),
                         _SelectionBias(3))


def _fragment(name: str, fragments: int) -> int:
    """Layer k of the three Linear layers ("0.", "2.", "4.") -> its fragment; the bias ("5.")
    goes with the last layer."""
    return min(int(name.split(".")[0]) // 2, 2) * fragments // 3


def _inner_step(model: nn.Module, optimizer: torch.optim.Optimizer, island: int, step: int,
                bias_rate: float = 0.0) -> None:
    x, y = _batches(island, step)
    out = model(x)
    loss = ((out - y) ** 2).mean()
    loss.backward()
    if bias_rate:  # before the optimizer step, from this batch's outputs, as the trainer does
        with torch.no_grad():
            model[5].expert_bias_E += bias_rate * torch.sign(y.mean(0) - out.mean(0))
    optimizer.step()
    optimizer.zero_grad()


def _inner_optimizer(model: nn.Module, options: dict) -> torch.optim.Optimizer:
    if options.get("inner") == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1)
    return torch.optim.AdamW(model.parameters(), lr=0.05)


DEFAULTS = {"lr": 0.7, "momentum": 0.9, "quantize": "none", "fragments": 1, "overlap": 0,
            "delayed": False, "H": INNER_STEPS, "steps": INNER_STEPS * OUTER_STEPS, "bias_rate": 0.0}


class _IdentityThroughGather(Codec):
    """fp32 on the wire through the quantised path (all-gather, decode, sum in island order)."""

    lossy = True


def _by_value(state):
    """A state dict copied as a checkpoint holds it: tensors cloned, the rest as it is."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {key: _by_value(value) for key, value in state.items()}
    if isinstance(state, list):
        return [_by_value(value) for value in state]
    return state


def _island_state(rank: int, islands: int, store: dist.Store, options: dict):
    """A fresh model, inner optimizer, outer group and DiLoCo of one island."""
    group = OuterGroup(store, rank, islands, 0, timeout_s=60)
    model = _model()
    inner = _inner_optimizer(model, options)
    codec = _IdentityThroughGather() if options["quantize"] == "gather" else \
        make_codec(options["quantize"], 16)
    buffers = list(model.named_buffers()) if options["bias_rate"] else []
    diloco = DiLoCo(list(model.named_parameters()), buffers, group, inner_steps=options["H"],
                    outer_lr=options["lr"], outer_momentum=options["momentum"], nesterov=True,
                    codec=codec, fragments=options["fragments"],
                    fragment_of_name=lambda name: _fragment(name, options["fragments"]),
                    overlap_steps=options["overlap"], delayed_update=options["delayed"])
    return group, model, inner, diloco


def _island(rank: int, islands: int, port: int, options: dict, results) -> None:
    try:
        options = {**DEFAULTS, **options}
        store = dist.TCPStore("127.0.0.1", port, islands, rank == 0, timeout=datetime.timedelta(seconds=60))
        group, model, inner, diloco = _island_state(rank, islands, store, options)
        retired = []  # groups replaced by a reload: their last transfers finish in the background
        events = []
        for step in range(1, options["steps"] + 1):
            _inner_step(model, inner, rank, step, options["bias_rate"])
            if options.get("corrupt") == rank and step == options["H"]:
                with torch.no_grad():
                    diloco.global_locals[0].add_(1e-3)
            events += diloco.after_inner_step(step, position=step)
            if step == options.get("reload_at"):  # as a resume from a snapshot taken now does
                saved = [_by_value(s.state_dict()) for s in (model, inner, diloco)]
                retired.append(group)
                group, model, inner, diloco = _island_state(rank, islands,
                                                            dist.PrefixStore(f"reload-{step}", store), options)
                for target, state in zip((model, inner, diloco), saved):
                    target.load_state_dict(state)
        events += diloco.finish(options["steps"], position=options["steps"])
        store.set(f"done/{rank}", "1")
        if rank == 0:  # it hosts the store: the others may still be reading it
            store.wait([f"done/{r}" for r in range(islands)], datetime.timedelta(seconds=60))
        results.put((rank, "ok", [t.detach().numpy().copy() for t in (*model.parameters(), *model.buffers())],
                     [e["state_sha256"] for e in events], group.bytes_sent))  # by value
    except Exception as exc:
        results.put((rank, "error", f"{type(exc).__name__}: {exc}", traceback.format_exc(), 0))


def run_islands(islands: int, **options) -> dict:
    port = free_port()
    out = {}
    with spawned() as (start, results):
        for rank in range(islands):
            start(_island, rank, islands, port, options)
        for _ in range(islands):
            rank, status, params, *rest = results.get(timeout=RESULT_TIMEOUT_S)
            out[rank] = [status, [torch.from_numpy(p) for p in params] if status == "ok" else params, *rest]
    return out


def naive_diloco(islands: int, **options) -> list[torch.Tensor]:
    """The islands one after the other in one process, written out step by step: torch's
    SGD is the outer optimizer; fragments, overlap and delayed (eager) updates as specified.
    A lossy `quantize` sends each island's pseudo-gradient of a fragment (flattened in
    parameter order) through encode and decode, the mean is of what arrived, and with int4
    each island carries what its payload missed into its next send of that fragment. Router
    buffers are averaged over the islands whenever their fragment syncs, keeping what each
    island's buffer moved while the sync was in flight. Returns the global parameters, then
    island 0's buffers."""
    o = {**DEFAULTS, **options}
    H, F, tau, steps = o["H"], o["fragments"], o["overlap"], o["steps"]
    codec = make_codec(o["quantize"], 16) if o["quantize"] != "none" else None
    models = [_model() for _ in range(islands)]
    inners = [_inner_optimizer(m, o) for m in models]
    names = [n for n, _ in models[0].named_parameters()]
    frag_params = [[i for i, n in enumerate(names) if _fragment(n, F) == f] for f in range(F)]
    buffer_fragment = _fragment(next(n for n, _ in models[0].named_buffers()), F)
    global_params = [p.detach().clone() for p in models[0].parameters()]
    outer = torch.optim.SGD(global_params, lr=o["lr"], momentum=o["momentum"], nesterov=o["momentum"] > 0)
    params = [list(m.parameters()) for m in models]
    buffers = [m[5].expert_bias_E for m in models]
    errors = [[torch.zeros_like(p) for p in ps] for ps in params] if o["quantize"] == "int4" else None
    starts = [[p.detach().clone() for p in ps] for ps in params]
    in_flight = []  # what each sync carries, in the order sent
    last_mean = {}

    def mean_of(deltas, i):
        total = deltas[0][i].clone()
        for d in deltas[1:]:
            total += d[i]
        return total / islands

    def through_the_wire(delta: dict, f: int) -> dict:
        if codec is None:
            return delta
        flat = torch.cat([delta[i].reshape(-1) for i in frag_params[f]])
        decoded, offset = codec.decode(codec.encode(flat), flat.numel()), 0
        out = {}
        for i in frag_params[f]:
            out[i] = decoded[offset:offset + delta[i].numel()].view_as(delta[i])
            offset += delta[i].numel()
        return out

    def outer_step(f, received):
        for i in frag_params[f]:
            global_params[i].grad = mean_of(received, i)
        outer.step()
        for i in frag_params[f]:
            last_mean[(f, i)] = global_params[i].grad
            global_params[i].grad = None

    def send(f, step, overlap):
        ref = starts if o["delayed"] else [global_params] * islands
        deltas = [{i: ref[m][i] - params[m][i].detach() for i in frag_params[f]} for m in range(islands)]
        if errors is not None:
            deltas = [{i: d + errors[m][i] for i, d in deltas[m].items()} for m in range(islands)]
        entry = {"fragment": f, "apply": step + overlap, "deltas": deltas, "overlap": overlap,
                 "received": [through_the_wire(d, f) for d in deltas],
                 "sent": [{i: params[m][i].detach().clone() for i in frag_params[f]} for m in range(islands)],
                 "buffers": [b.clone() for b in buffers] if f == buffer_fragment else None}
        in_flight.append(entry)
        return entry

    def land(entry):
        f = entry["fragment"]
        in_flight.remove(entry)
        outer_step(f, entry["received"])
        if errors is not None:
            for m in range(islands):
                for i in frag_params[f]:
                    errors[m][i] = entry["deltas"][m][i] - entry["received"][m][i]
        if not o["delayed"]:
            for m in range(islands):
                for i in frag_params[f]:
                    params[m][i].copy_(global_params[i] + (params[m][i] - entry["sent"][m][i]))
        if entry["buffers"] is not None:
            mean = mean_of(entry["buffers"], slice(None))
            for m in range(islands):
                drift = buffers[m] - entry["buffers"][m] if entry["overlap"] else None
                buffers[m].copy_(mean if drift is None else mean + drift)

    with torch.no_grad():
        for step in range(1, steps + 1):
            with torch.enable_grad():
                for island, (model, inner) in enumerate(zip(models, inners)):
                    _inner_step(model, inner, island, step, o["bias_rate"])
            due = [f for f in range(F) if step % H == ((f + 1) * H // F) % H]
            if not o["delayed"]:
                for entry in [e for e in in_flight if e["apply"] == step]:
                    land(entry)
                for f in due:
                    entry = send(f, step, tau)
                    if tau == 0:
                        land(entry)
                continue
            for f in due:
                had_previous = any(e["fragment"] == f for e in in_flight)
                for entry in [e for e in in_flight if e["fragment"] == f]:
                    land(entry)
                deltas = send(f, step, H)["deltas"]
                for m in range(islands):
                    scratch = [global_params[i].clone() for i in frag_params[f]]
                    eager = torch.optim.SGD(scratch, lr=o["lr"], momentum=o["momentum"],
                                            nesterov=o["momentum"] > 0)
                    for s, i in zip(scratch, frag_params[f]):
                        own = deltas[m][i]
                        s.grad = (own + (islands - 1) * last_mean[(f, i)]) / islands if had_previous else own
                        if "momentum_buffer" in outer.state.get(global_params[i], {}):
                            eager.state[s]["momentum_buffer"] = outer.state[global_params[i]]["momentum_buffer"].clone()
                    eager.step()
                    for s, i in zip(scratch, frag_params[f]):
                        params[m][i].copy_(s)
                        starts[m][i].copy_(s)
        for entry in list(in_flight):
            land(entry)
        for f in range(F):
            if steps % H != ((f + 1) * H // F) % H:
                land(send(f, steps, 0))
    return global_params + [buffers[0]]


def _check_against_naive(islands: int, **options) -> dict:
    out = run_islands(islands, **options)
    expected = naive_diloco(islands, **options)
    for rank in range(islands):
        status, got, hashes, _ = out[rank]
        assert status == "ok", got
        assert len(got) == len(expected)  # the parameters, then the router buffer
        for g, e in zip(got, expected):
            assert torch.equal(g, e)
        assert hashes == out[0][2] and len(hashes) >= OUTER_STEPS
    assert bool(expected[-1].any()) == bool(options.get("bias_rate"))  # the buffer moved, if it should
    return out


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    {},  # plain DiLoCo: fragments=1, no overlap, no delay
    {"fragments": 3, "overlap": 1, "H": 3, "steps": 9},  # streaming with overlap
    {"fragments": 3, "delayed": True, "H": 3, "steps": 9},  # streaming with delayed eager updates
    # reloaded from their state dicts while syncs are in flight, onto a new outer group
    {"fragments": 3, "overlap": 2, "H": 3, "steps": 9, "quantize": "int4", "reload_at": 5},
    {"fragments": 3, "delayed": True, "H": 3, "steps": 9, "quantize": "int4", "reload_at": 5},
    # every codec (int4 with error feedback), with a router buffer each island moves on its own data
    {"quantize": "bf16", "bias_rate": 0.01},
    {"fragments": 3, "overlap": 1, "H": 3, "steps": 9, "quantize": "int8", "bias_rate": 0.01},
    {"fragments": 3, "delayed": True, "H": 3, "steps": 9, "quantize": "int4", "bias_rate": 0.01},
], ids=["plain", "streaming-overlap", "streaming-delayed", "overlap-reloaded", "delayed-reloaded",
        "bf16-buffer", "int8-overlap-buffer", "int4-delayed-buffer"])
def test_outer_step_matches_naive_loop_bitwise(options):
    """Two gloo islands end bit for bit where the naive single-process loop ends, with one
    hash per outer step, equal on both islands: with fp32, bf16, int8 and int4 (with error
    feedback) pseudo-gradients, and with a router buffer averaged at its fragment's syncs.
    Islands that reload their state while syncs are in flight (as after a restart from a
    memory snapshot) send those syncs again and end where islands that never stopped end."""
    if "reload_at" in options:
        reference = run_islands(2, **{k: v for k, v in options.items() if k != "reload_at"})
        reloaded = run_islands(2, **options)
        for rank in range(2):
            assert reference[rank][0] == reloaded[rank][0] == "ok", (reference[rank][1], reloaded[rank][1])
            assert all(torch.equal(g, e) for g, e in zip(reloaded[rank][1], reference[rank][1]))
            assert reloaded[rank][2] == reference[rank][2]
        return
    _check_against_naive(2, **options)


@pytest.mark.slow
def test_fp32_through_the_quantised_path_is_bitwise_fp32():
    through_gather = run_islands(2, quantize="gather")
    plain = run_islands(2, quantize="none")
    for rank in (0, 1):
        assert through_gather[rank][0] == plain[rank][0] == "ok"
        for a, b in zip(through_gather[rank][1], plain[rank][1]):
            assert torch.equal(a, b)
        assert through_gather[rank][2] == plain[rank][2]


@pytest.mark.slow
def test_one_island_with_outer_lr_one_is_plain_training_bitwise():
    out = run_islands(1, lr=1.0, momentum=0.0)
    status, got, _, _ = out[0]
    assert status == "ok", got
    model = _model()
    inner = torch.optim.AdamW(model.parameters(), lr=0.05)
    for step in range(1, INNER_STEPS * OUTER_STEPS + 1):
        _inner_step(model, inner, 0, step)
    for g, p in zip(got, model.parameters()):
        assert torch.equal(g, p.detach())


def _ddp_rank(rank: int, store_file: str, steps: int, results) -> None:
    """Plain data parallelism with torch's DDP over 2 gloo ranks: island k's batches on rank k.
    They meet through a file, not a port another process could take in the meantime."""
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=REFERENCE_TIMEOUT_S))
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        for step in range(1, steps + 1):
            x, y = _batches(rank, step)
            ((ddp(x) - y) ** 2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        results.put((rank, [p.detach().numpy().copy() for p in model.parameters()]))  # by value
        dist.destroy_process_group()
    except Exception:
        results.put((rank, traceback.format_exc()))


REFERENCE_TIMEOUT_S = 30  # the reference takes ~3 s


def _ddp_reference(store: "os.PathLike", steps: int):
    """{rank: parameters (or a traceback)} of `_ddp_rank` on 2 processes; None if they hang."""
    import queue

    with spawned() as (start, results):
        procs = [start(_ddp_rank, rank, str(store), steps) for rank in range(2)]
        got, deadline = {}, time.monotonic() + 2 * REFERENCE_TIMEOUT_S
        while len(got) < 2 and time.monotonic() < deadline:
            try:
                rank, value = results.get(timeout=1)
                got[rank] = value
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:  # a rank that died without a word: its peer would wait for ever
                    print(f"DDP reference: a rank exited with code {dead[0]}", flush=True)
                    return None
    if len(got) < 2:
        print(f"DDP reference: ranks {sorted(set(range(2)) - set(got))} sent nothing", flush=True)
        return None
    timed_out = any(isinstance(v, str) and "timed out" in v.lower() for v in got.values())
    return None if timed_out else got


@pytest.mark.slow
def test_two_islands_one_inner_step_equal_data_parallelism(tmp_path):
    """islands=2, H=1, inner SGD, outer lr 1 without momentum is DDP over 2 ranks."""
    steps = 4
    islands = run_islands(2, lr=1.0, momentum=0.0, H=1, steps=steps, inner="sgd")
    ddp = _ddp_reference(tmp_path / "ddp-store", steps)
    if ddp is None:
        # The reference is torch's own DDP, not atoll: once in a full suite run its two gloo
        # ranks never met within 240 s. A second pair with a fresh store decides.
        ddp = _ddp_reference(tmp_path / "ddp-store-again", steps)
    assert ddp is not None, "the DDP reference's ranks did not finish twice"
    assert not isinstance(ddp[0], str), ddp[0]
    for rank in (0, 1):
        assert islands[rank][0] == "ok", islands[rank][1]
        for a, b in zip(islands[rank][1], ddp[rank]):
            torch.testing.assert_close(a, torch.from_numpy(b), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_int4_islands_end_identical_and_near_fp32():
    out = run_islands(2, quantize="int4")
    fp32 = naive_diloco(2)
    (s0, g0, h0, bytes0), (s1, g1, h1, _) = out[0], out[1]
    assert s0 == s1 == "ok", (g0, g1)
    assert h0 == h1  # the sender decodes its own payload too: bit-identical global state
    for a, b, ref in zip(g0, g1, fp32):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, ref, atol=0.03, rtol=0)
    params = sum(p.numel() for p in _model().parameters())
    # per outer step: the int4 payload (half a byte per value + a bf16 scale per 16) to one peer
    assert bytes0 <= OUTER_STEPS * (params // 2 + 2 + 2 * (params // 16 + 3 * 2))


@pytest.mark.slow
def test_diverged_island_is_named():
    out = run_islands(2, corrupt=1)
    for rank in (0, 1):
        status, message, *_ = out[rank]
        assert status == "error"
        assert "StateDiverged" in message and "sha256 differs" in message
    assert "island 1's" in out[0][1] and "island 0's" in out[1][1]


# ------------------------------------------------------------------ islands end to end

@pytest.mark.slow
def test_two_islands_under_torchrun_agree_after_every_outer_step(tmp_path):
    run_dir = tmp_path / "islands"
    proc = run_cli(["train", *TINY_MOE, "run.steps=8", "parallel.dp=1", "diloco.islands=2",
                    "diloco.inner_steps=4", "diloco.quantize=int8", "checkpoint.interval=0",
                    f"run.dir={run_dir}"], torchrun_procs=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "outer_step"]
    assert sorted((e["outer_step"], e["island"]) for e in steps) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for outer in (1, 2):
        hashes = {e["state_sha256"] for e in steps if e["outer_step"] == outer}
        assert len(hashes) == 1
    printed = [line for line in proc.stdout.splitlines() if ": outer step " in line]
    assert sorted(printed) == sorted(
        f"island {e['island']}: outer step {e['outer_step']} | 2 islands | {e['bytes_sent'] / 1e6:.2f} MB sent"
        f" | {e['seconds']:.2f} s | state {e['state_sha256'][:12]}" for e in steps)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert len(rows) == 8 and rows[-1]["loss"] < rows[0]["loss"]
    # comm_bytes counts every byte sent between islands: the outer steps' payloads, nothing else
    assert sum(r["comm_bytes"] for r in rows) == sum(e["bytes_sent"] for e in steps if e["island"] == 0) > 0


@pytest.mark.slow
def test_islands_compose_with_fsdp_expert_and_pipeline_parallelism(tmp_path):
    """Streaming int4 islands of dp=2 × ep=2 (FSDP), and of pp=2 (DDP), follow the trajectory
    of islands of one process with grad_accum=2 (the same batch per island), and agree on
    every hash."""
    common = [*TINY_MOE, "run.steps=8", "diloco.islands=2", "diloco.inner_steps=4", "diloco.fragments=2",
              "diloco.overlap_steps=1", "diloco.quantize=int4", "model.moe.balance=aux_free",
              "model.moe.zero_experts=1", "model.moe.constant_experts=1", "checkpoint.interval=0"]
    single = run_cli(["train", *common, "parallel.dp=1", "data.grad_accum=2", f"run.dir={tmp_path / 'a'}"],
                     torchrun_procs=2)
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = run_cli(["train", *common, "parallel.dp=2", "parallel.ep=2", f"run.dir={tmp_path / 'b'}"],
                      torchrun_procs=4)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    # pipeline microbatches hold one sample: the reference sees the same one-sample forwards
    piped = run_cli(["train", *common, "parallel.pp=2", "parallel.dp=1", "data.grad_accum=2",
                     "parallel.dp_shard=ddp", f"run.dir={tmp_path / 'c'}"], torchrun_procs=4)
    assert piped.returncode == 0, piped.stderr[-3000:]
    single_samples = run_cli(["train", *common, "parallel.dp=1", "data.micro_batch=1", "data.grad_accum=4",
                              f"run.dir={tmp_path / 'd'}"], torchrun_procs=2)
    assert single_samples.returncode == 0, single_samples.stderr[-3000:]
    for run in ("a", "b", "c", "d"):
        by_step = {}
        for e in events(tmp_path / run, "outer_step"):
            by_step.setdefault(e["outer_step"], set()).add(e["state_sha256"])
        assert len(by_step) >= 4 and all(len(h) == 1 for h in by_step.values())
    for name in ("loss", "grad_norm"):
        a, b, c, d = ([r[name] for r in read_jsonl(tmp_path / run / "metrics.jsonl")] for run in "abcd")
        assert len(a) == len(b) == len(c) == len(d) == 8
        # Until the first int4 sync lands (after step 3) the sharded islands compute one
        # process's steps; from then on a float difference can flip an int4 rounding.
        np.testing.assert_allclose(b[:3], a[:3], rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(b, a, rtol=2e-4, err_msg=name)
        np.testing.assert_allclose(c, d, rtol=1e-5, err_msg=name)  # one-sample forwards on both sides


# ------------------------------------------------------------------ islands that come and go

def _island_that_fails(rank: int, port: int, options: dict, results) -> None:
    """One island of a 2-island run: `die_at` ends the process abruptly after that step (after
    its sync was sent when that step starts one); `join_token` makes it a restarted island."""
    try:
        options = {**DEFAULTS, **options}
        store = dist.TCPStore("127.0.0.1", port, None, rank == 0 and "join_token" not in options,
                              timeout=datetime.timedelta(seconds=60), wait_for_workers=False)
        joining = "join_token" in options
        group = OuterGroup(store, rank, 2, 0, timeout_s=options["wait"], joining=joining)
        model = _model()
        inner = _inner_optimizer(model, options)
        diloco = DiLoCo(list(model.named_parameters()), [], group, inner_steps=options["H"],
                        outer_lr=options["lr"], outer_momentum=options["momentum"], nesterov=True,
                        codec=make_codec(options["quantize"], 16), overlap_steps=options["overlap"])
        first = 1
        if joining:
            first = diloco.join(options["join_token"], timeout_s=60) + 1
        committed = dict(diloco.positions)
        events, changes = [], []
        for step in range(first, options["steps"] + 1):
            # `pace` keeps the survivor stepping until the restarted island is back: from its
            # rejoin on, and on the joiner, the remaining steps need no pace.
            if not joining and not any(c["change"] == "rejoined" for c in changes):
                time.sleep(options.get("pace", 0.0))
            _inner_step(model, inner, rank, step)
            events += diloco.after_inner_step(step, position=step)
            changes += group.take_changes()
            if options.get("die_at") == step:
                os._exit(3)
        events += diloco.finish(options["steps"], position=options["steps"])
        if rank == 0:
            store.wait(["atoll/outer/report-1"], datetime.timedelta(seconds=60))  # the joiner has read it
        results.put((rank, "ok", [p.detach().numpy().copy() for p in model.parameters()],
                     [(e["outer_step"], e["state_sha256"], e["islands"]) for e in events],
                     {"first": first, "committed": committed, "changes": changes}))
        if rank == 1:
            store.set("atoll/outer/report-1", "1")
    except Exception as exc:
        results.put((rank, "error", f"{type(exc).__name__}: {exc}", traceback.format_exc(), {}))


@pytest.mark.slow
@pytest.mark.parametrize("overlap, die_at", [(0, 7), (2, 6)], ids=["between-syncs", "mid-reduction"])
def test_lost_island_survivor_goes_on_and_restarted_island_rejoins_bit_identical(overlap, die_at):
    """Island 1 dies (between syncs, or while its reduction is in flight); island 0 waits at most
    wait_timeout_s, goes on alone, admits the restarted island at an outer step with the shared
    state from its peer; both end with the same global state and hashes."""
    port = free_port()
    common = {"H": 3, "steps": 90, "wait": 3.0, "overlap": overlap, "pace": 0.1}
    out = {}
    with spawned() as (start, results):
        start(_island_that_fails, 0, port, common)
        doomed = start(_island_that_fails, 1, port, {**common, "die_at": die_at})
        doomed.join(timeout=RESULT_TIMEOUT_S)
        assert doomed.exitcode == 3
        start(_island_that_fails, 1, port, {**common, "join_token": "try-2"})
        for _ in range(2):
            rank, *rest = results.get(timeout=RESULT_TIMEOUT_S)
            out[rank] = rest
    (s0, params0, events0, info0), (s1, params1, events1, info1) = out[0], out[1]
    assert s0 == "ok", events0
    assert s1 == "ok", events1
    for a, b in zip(params0, params1):
        assert np.array_equal(a, b)
    # The survivor went on alone, then with the joiner; the joiner's outer steps hash as the survivor's.
    assert [c["change"] for c in info0["changes"]] == ["lost", "rejoined"]
    assert 1 in {islands for _, _, islands in events0}
    assert events1 and set(events1) <= set(events0)
    # The restarted island continues its stream where its last committed sync left it.
    last_committed = (die_at // 3) * 3 if overlap == 0 else die_at - die_at % 3 - 3
    assert info1["committed"][1] == last_committed
    assert info1["first"] > die_at


ISLANDS_ON_RAY = [*TINY_MOE, "parallel.dp=1", "diloco.islands=2", "diloco.inner_steps=4",
                  "diloco.overlap_steps=2", "diloco.quantize=int8", "diloco.wait_timeout_s=4",
                  "diloco.bandwidth_mbit=20", "run.steps=64", "checkpoint.interval=0",
                  "checkpoint.memory_interval=1", "fault_tolerance.hang_timeout_s=40"]


@pytest.mark.slow
def test_killed_island_on_ray_rejoins_while_the_other_keeps_stepping(short_tmp):
    """SIGKILL island 1's rank twice (the second time while its reduction is in flight on a
    throttled link); island 0 never restarts, the supervisor restarts island 1 alone, it
    rejoins from island 0 with the same state hash and its stream's committed position."""
    run_dir = short_tmp / "islands"
    proc = start_ray_run([*ISLANDS_ON_RAY, f"run.dir={run_dir}"], short_tmp)
    with ended(proc):
        kills = []
        for kill in range(2):
            wait_for(lambda: len(events(run_dir, "membership")) >= 2 * kill and last_step(run_dir) >= 6 + 12 * kill,
                     120, proc, "training")
            if kill:  # mid-reduction: island 1 sent its sync and has not landed it
                wait_for(lambda: last_step(run_dir) % 4 in (1, 2), 60, proc, "a reduction in flight")
            pid = next(r["pid"] for r in events(run_dir, "workers")[-1]["ranks"] if r["island"] == 1)
            os.kill(pid, signal.SIGKILL)
            kills.append(pid)
            wait_for(lambda: len(events(run_dir, "membership")) >= 2 * kill + 2, 120, proc, "the rejoin")
        out, err = finish(proc, 300)
    assert proc.returncode == 0, err[-3000:]
    failures = events(run_dir, "failure")
    assert [f["pid"] for f in failures] == kills and all(f["kind"] == "died" for f in failures)
    workers = events(run_dir, "workers")
    assert [w.get("restarted_island") for w in workers] == [None, 1, 1]
    # island 0 kept its process and stepped on: one metrics row per step, never rewound
    assert len({r["pid"] for w in workers for r in w["ranks"] if r["island"] == 0}) == 1
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, 65))
    membership = events(run_dir, "membership")
    assert [(m["island"], m["change"]) for m in membership] == [(1, "lost"), (1, "rejoined")] * 2
    outer = [e for e in events(run_dir, "outer_step")]
    rejoins = [e for e in events(run_dir, "resume") if e.get("source") == "peer"]
    assert len(rejoins) == 2
    for rejoin in rejoins:
        # the restarted island continues its own stream where its last committed sync left it
        before = [e for e in outer if e["island"] == 0 and e["outer_step"] <= rejoin["outer_step"]]
        assert rejoin["samples"] == before[-1]["positions"]["1"]
    # after every outer step both islands hold the same state (also right after the rejoin)
    by_step = {}
    for e in outer:
        by_step.setdefault(e["outer_step"], {})[e["island"]] = e["state_sha256"]
    both = [hashes for hashes in by_step.values() if len(hashes) == 2]
    assert both and all(h[0] == h[1] for h in both)
    assert max(by_step) == max(s for s, h in by_step.items() if len(h) == 2)  # they ended together


def _island_tensors(run_dir) -> dict[str, torch.Tensor]:
    """Every island's tensors of the newest checkpoint, named island-k/<tensor>."""
    ckpt = resolve_checkpoint(run_dir)
    manifest = verify(ckpt)
    out = {}
    for island in range(manifest["islands"]):
        for name, tensor in read_tensors(island_dir(ckpt, island), manifest["tensors"]).items():
            out[f"island-{island}/{name}"] = tensor
    return out


# Streaming int4 islands with delayed updates, for the two tests below.
STREAMING_DELAYED = [*TINY_MOE, "run.steps=32", "parallel.dp=1", "diloco.islands=2", "diloco.inner_steps=4",
                     "diloco.fragments=2", "diloco.delayed_update=true", "diloco.quantize=int4",
                     "model.moe.balance=aux_free"]


@pytest.fixture(scope="module")
def streaming_delayed_whole(tmp_path_factory):
    """The uninterrupted run of STREAMING_DELAYED (a disk checkpoint every 8 steps, all kept: a
    resume starts from step 8), which the resumed and the restarted runs must end on;
    checkpoints and snapshots change no number."""
    run_dir = tmp_path_factory.mktemp("streaming_delayed") / "whole"
    whole = run_cli(["train", *STREAMING_DELAYED, "checkpoint.interval=8", "checkpoint.keep=4",
                     "checkpoint.memory_interval=0", f"run.dir={run_dir}"], torchrun_procs=2)
    assert whole.returncode == 0, whole.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_streaming_delayed_islands_resume_exactly_from_a_checkpoint(tmp_path, streaming_delayed_whole):
    """Resumed from the checkpoint of step 8 (taken while every fragment's delayed sync was
    in flight), streaming int4 islands with delayed updates end bit for bit where the
    uninterrupted run ends: global and local parameters, inner and outer optimizer state,
    error feedback, every island's data position. A resume under another inner layout
    (dp=2 FSDP islands) goes on from the same state."""
    common = [*STREAMING_DELAYED, "checkpoint.interval=8", "checkpoint.memory_interval=0"]
    whole = streaming_delayed_whole
    split = tmp_path / "split"
    first = run_cli(["train", *common, "run.stop_at=12", f"run.dir={split}"], torchrun_procs=2)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(["train", *common, f"run.dir={split}",
                      f"checkpoint.resume={split / 'checkpoints' / 'step-00000008'}"], torchrun_procs=2)
    assert second.returncode == 0, second.stderr[-3000:]
    assert [e["step"] for e in events(split, "resume")] == [8]
    got, want = _island_tensors(split), _island_tensors(whole)
    assert got.keys() == want.keys()
    assert any(".global." in k for k in want) and any(".error." in k for k in want)
    assert any(k.startswith("island-1/") and k.endswith(".exp_avg_sq") for k in want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    # the newest hash of each outer step (the split run did outer steps after step 8 twice)
    hashes = lambda run: {e["outer_step"]: e["state_sha256"] for e in events(run, "outer_step")
                          if e["island"] == 0}
    assert hashes(split) == hashes(whole)
    assert losses(split) == losses(whole)
    assert grad_norms(split) == grad_norms(whole)

    relaid = tmp_path / "relaid"
    resumed = run_cli(["train", *common, "parallel.dp=2", "data.micro_batch=1", "run.stop_at=16",
                       f"run.dir={relaid}", f"checkpoint.resume={resolve_checkpoint(whole).parent / 'step-00000008'}"],
                      torchrun_procs=4)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [e["step"] for e in events(relaid, "resume")] == [8]
    rows = read_jsonl(relaid / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(9, 17))
    np.testing.assert_allclose([r["loss"] for r in rows], losses(whole)[8:16], rtol=1e-3)


@pytest.mark.slow
def test_islands_restarted_by_torchrun_resume_from_memory_bitwise(tmp_path, streaming_delayed_whole):
    """torchrun restarts both islands after island 1's rank is killed between disk checkpoints;
    they resume together from the newest memory snapshot every island holds (streaming, delayed
    int4 syncs in flight are sent again) and end bit for bit where the uninterrupted run ends."""
    common = [*STREAMING_DELAYED, "checkpoint.interval=16", "checkpoint.memory_interval=1"]
    whole = streaming_delayed_whole

    run_dir = tmp_path / "restarted"
    proc = start_torchrun(["train", *common, f"run.dir={run_dir}"], procs=2, max_restarts=1)
    with ended(proc):
        wait_for(lambda: last_step(run_dir) >= 1 and len(torchrun_ranks(proc)) == 2, 180, proc, "training")
        island_1 = torchrun_ranks(proc)["1"]  # found now: the run has little left after step 22
        # Island 0 lands a sync at step 22 only once island 1 has sent its own: both are past it.
        wait_for(lambda: last_step(run_dir) >= 22, 180, proc, "training to pass step 22")
        island_1.kill()
        out, err = finish(proc, 300)
    assert proc.returncode == 0, err[-3000:]
    resumes = events(run_dir, "resume")
    assert len(resumes) == 1 and resumes[0]["source"] == "memory" and resumes[0]["step"] > 16, out[-3000:]
    got, want = _island_tensors(run_dir), _island_tensors(whole)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    hashes = lambda run: [e["state_sha256"] for e in events(run, "outer_step")
                          if e["island"] == 0 and e["outer_step"] > 8]
    assert hashes(run_dir)[-4:] == hashes(whole)[-4:]
    assert losses(run_dir) == losses(whole)
    assert grad_norms(run_dir) == grad_norms(whole)


@pytest.mark.slow
def test_islands_started_from_a_plain_checkpoint_continue_like_data_parallelism(tmp_path):
    """A DDP run's checkpoint continued by 2 islands (H=1, inner SGD, outer lr 1 without
    momentum) ends where DDP continuing it ends, and each island's stream takes its half of
    the samples DDP had consumed."""
    common = [*TINY_MOE, "optim.name=sgd", "optim.lr=0.05", "optim.grad_clip=0", "optim.warmup_steps=0",
              "run.steps=12", "checkpoint.interval=6", "checkpoint.memory_interval=0"]
    ddp = ["parallel.dp=2", "parallel.dp_shard=ddp"]
    pre = run_cli(["train", *common, *ddp, "run.stop_at=6", f"run.dir={tmp_path / 'ddp'}"], torchrun_procs=2)
    assert pre.returncode == 0, pre.stderr[-3000:]
    start = resolve_checkpoint(tmp_path / "ddp")
    islands = run_cli(["train", *common, "parallel.dp=1", "diloco.islands=2", "diloco.inner_steps=1",
                       "diloco.outer_lr=1", "diloco.outer_momentum=0", f"checkpoint.resume={start}",
                       f"run.dir={tmp_path / 'islands'}"], torchrun_procs=2)
    assert islands.returncode == 0, islands.stderr[-3000:]
    # 6 DDP steps × 4 samples, counted per island from here on
    assert (f"warm start: checkpoint {start.name} was saved with 1 island; 2 islands start from its "
            "weights, optimizer and schedule at step 6 with a fresh outer optimizer, and share out the "
            "24 samples it consumed: each island's data stream goes on after its first 12 (samples are "
            "counted per island)\n") in islands.stdout
    assert f"resumed from {start}" not in islands.stdout
    rest = run_cli(["train", *common, *ddp, f"run.dir={tmp_path / 'ddp'}"], torchrun_procs=2)
    assert rest.returncode == 0, rest.stderr[-3000:]
    first = [e for e in events(tmp_path / "islands", "outer_step") if e["outer_step"] == 1]
    assert {e["positions"]["0"] for e in first} == {12 // 2 * 2 + 2}  # 6 DDP steps × 4 samples / 2, + 1 step
    got = _island_tensors(tmp_path / "islands")
    want = final_state(tmp_path / "ddp")
    params = [k for k in want if k.startswith("model.")]
    assert params
    for name in params:
        for island in (0, 1):
            torch.testing.assert_close(got[f"island-{island}/{name}"], want[name], rtol=0, atol=1e-5)
            global_name = f"island-{island}/diloco.global.{name[len('model.'):]}"
            if global_name in got:  # a parameter, not the router's bias buffer
                assert torch.equal(got[global_name], got[f"island-{island}/{name}"])
