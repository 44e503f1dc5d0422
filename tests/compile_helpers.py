"""Checks shared by several tests: one compiled static step equals eager, caches included;
a device-mode run reads nothing back but ``torch.cond``'s predicates."""

import contextlib
from unittest import mock

import torch

from omnicache.runtime.syncguard import count_host_syncs


def cache_state(ex):
    return [t.clone() for t in ex.cache_tensors()]


def restore_cache(ex, saved):
    for t, s in zip(ex.cache_tensors(), saved):
        t.copy_(s)


def compile_step_equals_eager(ex, i, backend, atol=1e-6):
    """Run steps ``0..i-1`` eagerly, then step ``i`` eagerly and under
    ``torch.compile(fullgraph=True)`` from the same caches: outputs, statistics and the
    caches it writes must agree."""
    torch._dynamo.reset()
    x = ex.init_noise(0)
    with torch.no_grad():
        for j in range(i):
            x, _ = ex.step_fn(j)(x)
        before = cache_state(ex)
        eager, eager_stats = ex.step_fn(i)(x)
        after = cache_state(ex)
        restore_cache(ex, before)
        compiled, compiled_stats = torch.compile(ex.step_fn(i), fullgraph=True, backend=backend)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=atol)
    for a, b in zip(compiled_stats, eager_stats):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(cache_state(ex), after):  # the compiled step wrote the caches like eager
        torch.testing.assert_close(a, b, rtol=1e-5, atol=atol)


@contextlib.contextmanager
def only_cond_reads():
    """Every value read back inside the block is an eager ``torch.cond`` evaluating its
    predicate (``if pred``: one ``__bool__`` per ``torch.cond``; a CUDA-graph capture removes
    them): the cache bookkeeping itself reads nothing. Yields the list of predicates."""
    # eager torch.cond traces its branches with dynamo; branches cached for an earlier model
    # (same code, other constants) make it recompile with Python floats (a norm's eps) lifted
    # into host tensors it reads back with .item(): host scalars, no device read, but counted
    torch._dynamo.reset()
    conds = []
    cond = torch.cond

    def counted(pred, *args, **kwargs):
        conds.append(pred)
        return cond(pred, *args, **kwargs)

    with mock.patch.object(torch, "cond", counted), count_host_syncs() as syncs:
        yield conds
    assert dict(syncs.by_method) == ({"__bool__": len(conds)} if conds else {}), (syncs, len(conds))
