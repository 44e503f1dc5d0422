"""Sequence parallelism: dynamic statistics summed over 2 gloo ranks (CPU, localhost) equal the
unsharded ones, so every rank takes the decision of the single-process run; end to end on a
tiny Flux transformer under diffusers' own context parallelism (Ulysses)."""

import datetime
import os
import socket
import traceback
import types
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from omnicache.cache import HostDecisions
from omnicache.policies import FirstBlockCacheConfig

WORLD, STEPS = 2, 8


def _signals():
    """A drifting signal (rows, tokens, dim) per step, the same on every rank."""
    g = torch.Generator().manual_seed(0)
    base, drift = torch.randn(2, 12, 8, generator=g), torch.randn(2, 12, 8, generator=g)
    return [base + 0.05 * (i ** 1.5) * drift for i in range(STEPS)]


def _decisions(rank=None, world=1, group=None):
    """FirstBlockCache decisions over the steps, as every engine takes them (the core's
    HostDecisions, one decision per call); the rank sees its shard of the tokens only."""
    dec = HostDecisions(FirstBlockCacheConfig(threshold=0.2).decider(STEPS, 4), per_sample=False, group=group)
    out = []
    for sig in _signals():
        if rank is not None:
            sig = sig.chunk(world, dim=1)[rank].contiguous()
        compute, _ = dec.decide(sig)
        out.append((compute[0], None if dec.last_rel is None else dec.last_rel[0]))
    return out


def _start_ranks(target):
    """Start ``WORLD`` spawned processes ``target(rank, port, queue)`` on a free localhost port;
    returns ``(processes, queue)``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, port, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    return procs, queue


def _worker(rank, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        queue.put((rank, _decisions(rank, WORLD, dist.group.WORLD),
                   _decisions(rank, WORLD, None)))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_sharded_decisions_equal_single_process():
    procs, queue = _start_ranks(_worker)
    results = dict((r, (red, local)) for r, red, local in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    single = _decisions()
    assert 0 < sum(c for c, _ in single) < STEPS  # both decisions occur
    for r in range(WORLD):
        red, _ = results[r]
        assert [c for c, _ in red] == [c for c, _ in single]
        assert all((a is None and b is None) or abs(a - b) < 1e-5 for (_, a), (_, b) in zip(red, single))
    # without the reduction the ranks measure different values (and may decide apart)
    assert results[0][1] != results[1][1]


# ------------------------------------------------------- diffusers context parallelism, end to end
CP_STEPS = 8
# single-process rel-L1 per step after the first: .271 .235 .335 .341 .233 .275 .315, hence
# compute, reuse, reuse, compute, compute, reuse, reuse, compute; the closest is 0.015 away
CP_THRESHOLD = 0.3
# float32: Ulysses attends over the keys in another order ([txt0, img0, txt1, img1]) and sums
# in other orders, so outputs differ by rounding only: 3.3e-7 at most here (|out| <= 1.6, 2-3 ulp)
# after 8 steps; flipping one decision (the last step's) moves them by 0.08
CP_ATOL, CP_RTOL = 1e-6, 1e-5


def _cp_available():
    if not dist.is_available():
        return "torch.distributed is not available"
    try:
        from diffusers import ContextParallelConfig, FluxTransformer2DModel  # noqa: F401
    except ImportError as err:
        return f"diffusers with ContextParallelConfig is not installed ({err})"
    if not hasattr(FluxTransformer2DModel, "enable_parallelism"):
        return "this diffusers has no ModelMixin.enable_parallelism"
    return None


CP_SKIP = _cp_available()


def _flux():
    """A tiny random Flux (seed 0) and its inputs: 16 image and 6 text tokens, both split evenly
    over 2 ranks (diffusers' EquipartitionSharder asserts divisibility); 2 heads, 1 per rank."""
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    m = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
                               attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                               pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]).eval()
    g = torch.Generator().manual_seed(1)
    enc, pooled = torch.randn(2, 6, 32, generator=g), torch.randn(2, 32, generator=g)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.), torch.arange(4.), indexing="ij"), -1)
    kw = {"encoder_hidden_states": enc, "pooled_projections": pooled, "img_ids": img_ids.reshape(-1, 3),
          "txt_ids": torch.zeros(6, 3)}
    return m, kw


def _sample(m, kw):
    """Euler-like loop as a Flux pipeline calls the transformer (under ``cache_context("cond")``);
    returns the last output (gathered over the ranks under context parallelism)."""
    x = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(2))
    for i in range(CP_STEPS):
        t = torch.full((2,), 1.0 - i / CP_STEPS)
        with m.cache_context("cond"), torch.no_grad():
            out = m(hidden_states=x, timestep=t, return_dict=False, **kw)[0]
        x = x - out / CP_STEPS
    return out


def _run(m, kw, config, group=None):
    from omnicache.integrations import diffusers as od
    od.enable(m, config, steps=CP_STEPS, group=group)
    try:
        out = _sample(m, kw)
        s = od.summary(m).contexts["cond"]
        return out, s, od.adapter_of(m)[1]
    finally:
        od.disable(m)


def _decisions_of(s):
    return [d["compute"] for d in s["stats"]], [d["signal_rel_l1"] for d in s["stats"]]


def _cp_worker(rank, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        from diffusers import ContextParallelConfig

        from omnicache.policies import FORAConfig
        m, kw = _flux()
        # diffusers 0.42 ModelMixin._resolve_parallel_config: ``torch.device(device_type, rank %
        # torch.accelerator.device_count())`` divides by zero without an accelerator (the device is
        # only recorded); with count 1 the device is cpu:0 and nothing else changes
        n_acc = torch.accelerator.device_count()
        with mock.patch.object(torch.accelerator, "device_count", lambda: max(n_acc, 1)):
            m.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
        cp_group = m._parallel_config.context_parallel_config._flattened_mesh.get_group()
        res = {}
        # group=None: taken from the model's context-parallel config
        out, s, rt = _run(m, kw, FirstBlockCacheConfig(threshold=CP_THRESHOLD))
        # outputs as numpy arrays, sent by value (a tensor goes through shared memory, which is
        # gone if this process exits before the parent reads it)
        res["fbc"] = (out.numpy(), *_decisions_of(s), rt.resolve_group() is cp_group)
        # static plan (no communication): its forward goes beneath diffusers' input-split hook
        out, s, _ = _run(m, kw, FORAConfig(interval=2), group=cp_group)
        inner = m._diffusers_hook._fn_refs[0].forward  # disable() put the class forward back there
        res["fora"] = out.numpy(), s["trace"], inner == types.MethodType(type(m).forward, m)
        # each rank reduces over itself only (a one-rank group): its own shard's statistics.
        # threshold 0 computes every step, so the ranks' attention collectives stay matched.
        own = [dist.new_group([r]) for r in range(WORLD)][rank]
        _, s, _ = _run(m, kw, FirstBlockCacheConfig(threshold=0.0), group=own)
        res["local"] = _decisions_of(s)[1]
        _, s, _ = _run(m, kw, FirstBlockCacheConfig(threshold=0.0))
        res["reduced"] = _decisions_of(s)[1]
        queue.put((rank, res))
    except BaseException:
        queue.put((rank, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(CP_SKIP is not None, reason=str(CP_SKIP))
def test_diffusers_context_parallel_equals_single_process():
    """2 gloo ranks run a tiny Flux under diffusers' Ulysses context parallelism with omnicache's
    FirstBlockCache: every rank takes the single-process decisions (compute and reuse both occur)
    and the output equals the single-process output; a static plan too. Each rank's own shard
    measures other statistics than the whole sequence (the reduction matters)."""
    from omnicache.policies import FORAConfig
    procs, queue = _start_ranks(_cp_worker)
    try:
        m, kw = _flux()  # the single-process runs, meanwhile
        ref_out, s, _ = _run(m, kw, FirstBlockCacheConfig(threshold=CP_THRESHOLD))
        ref_dec, ref_rel = _decisions_of(s)
        fora_out, s, _ = _run(m, kw, FORAConfig(interval=2))
        fora_trace = s["trace"]
        _, s, _ = _run(m, kw, FirstBlockCacheConfig(threshold=0.0))
        full_rel = _decisions_of(s)[1]
        results = dict(queue.get(timeout=120) for _ in procs)
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
    for r in range(WORLD):
        assert isinstance(results[r], dict), f"rank {r} failed:\n{results[r]}"
    assert [p.exitcode for p in procs] == [0] * WORLD

    assert 0 < sum(ref_dec) < CP_STEPS  # (c) both compute and reuse
    assert min(abs(x - CP_THRESHOLD) for x in ref_rel[1:]) > 1e-2  # no decision on a knife edge
    for r in range(WORLD):
        out, dec, rel, auto_group = results[r]["fbc"]
        assert auto_group
        assert dec == ref_dec  # (a) every rank decides as the single process
        assert rel[0] is None and max(abs(a - b) for a, b in zip(rel[1:], ref_rel[1:])) < 1e-5
        torch.testing.assert_close(torch.from_numpy(out), ref_out, atol=CP_ATOL, rtol=CP_RTOL)  # (b)
        out, trace, restored = results[r]["fora"]
        assert trace == fora_trace and restored
        torch.testing.assert_close(torch.from_numpy(out), fora_out, atol=CP_ATOL, rtol=CP_RTOL)
        # the reduced statistics are the whole sequence's; one shard's are not
        assert max(abs(a - b) for a, b in zip(results[r]["reduced"][1:], full_rel[1:])) < 1e-5
        assert max(abs(a - b) for a, b in zip(results[r]["local"][1:], full_rel[1:])) > 1e-3
    # (d) without the reduction the two ranks measure different values
    assert max(abs(a - b) for a, b in zip(results[0]["local"][1:], results[1]["local"][1:])) > 1e-3
