"""Sequence parallelism: make every rank take the same dynamic caching decision.

When the token sequence is sharded across ranks (diffusers' context parallelism, xDiT,
Ulysses/ring attention), each rank sees only its shard of the signal a dynamic policy
compares. The relative L1 ``Σ|s - s_ref| / Σ|s_ref|`` is a ratio of two sums over
tokens, so summing both sums over the group (``all_reduce``, SUM; the cache core's
:func:`omnicache.cache.relative_change_device` does it when given the group) gives every
rank the value of the unsharded run, hence the same decision and the same output. The
collective returns one result to every rank, so the ranks' decisions are identical, not
merely close.

With diffusers' context parallelism (``model.enable_parallelism(config=ContextParallelConfig(
...))``) the group is the one the model's inputs are sharded over,
:func:`context_parallel_group`; :func:`omnicache.integrations.diffusers.enable` takes it
when given ``group=None``.
"""

from __future__ import annotations

__all__ = ["context_parallel_group"]


def context_parallel_group(model):
    """The process group over which diffusers' context parallelism shards ``model``'s sequence
    (the flattened ring x Ulysses mesh of its ``ContextParallelConfig``), or None when
    context parallelism is not enabled on ``model``."""
    cp = getattr(getattr(model, "_parallel_config", None), "context_parallel_config", None)
    mesh = getattr(cp, "_flattened_mesh", None)
    return None if mesh is None else mesh.get_group()
