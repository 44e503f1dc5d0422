"""Sequence parallelism: dynamic statistics summed over 2 gloo ranks (CPU, localhost) equal the
unsharded ones, so every rank takes the decision of the single-process run."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from omnicache import ops
from omnicache.integrations.distributed import all_reduce_sums
from omnicache.policies import FirstBlockCacheConfig

WORLD, STEPS = 2, 8


def _signals():
    """A drifting signal (rows, tokens, dim) per step, the same on every rank."""
    g = torch.Generator().manual_seed(0)
    base, drift = torch.randn(2, 12, 8, generator=g), torch.randn(2, 12, 8, generator=g)
    return [base + 0.05 * (i ** 1.5) * drift for i in range(STEPS)]


def _decisions(rank=None, world=1, group=None):
    """FirstBlockCache decisions over the steps; the rank sees its shard of the tokens only."""
    dec = FirstBlockCacheConfig(threshold=0.2).decider(STEPS, 4)
    dec.start(1)
    ref, out = None, []
    for i, sig in enumerate(_signals()):
        if rank is not None:
            sig = sig.chunk(world, dim=1)[rank].contiguous()
        rel = None
        if ref is not None:
            sums = ops.rel_l1(sig, ref).sum(0)
            if group is not None:
                all_reduce_sums(sums, group)
            rel = (sums[0] / sums[1]).item()
        compute = dec.decide(i, [rel])[0]
        if compute:
            ref = sig
        out.append((compute, rel))
    return out


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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
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
