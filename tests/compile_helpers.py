"""Checks that one compiled static step equals eager, caches included (used by several tests)."""

import torch


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
