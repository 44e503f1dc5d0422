"""Triton kernels of the omnicache ops, installed as ``omnicache.kernels``.

One module per op, each holding its ``@triton.jit`` kernel(s) and a launcher named
after the op (``omnicache.ops`` validates arguments, then calls the launcher):

- :mod:`.apply_residual`: ``apply_residual_(hidden, residual, correction=None, gamma=None,
  correction2=None, gate=None)``
- :mod:`.store_residual`: ``store_residual_(cache, delta, out, inp, delta2=None) -> [B, 4]``
- :mod:`.trajectory_stats`: ``trajectory_stats(x_next, x, x_prev) -> [B, 3]``
- :mod:`.rel_l1`: ``rel_l1(a, b) -> [B, 2]``
- :mod:`.token_update`: ``token_update_(cache, index, values, hidden) -> out`` and
  ``gather_tokens(x, index) -> [B, K, C]`` (ToCa)

Shared helpers (block sizes, contiguity, stage 2 of the reductions) are in :mod:`.utils`.
Importing this package imports triton (``omnicache.ops`` imports it lazily). The
launchers are reached through their modules (``kernels.rel_l1.rel_l1``), not
re-exported: two launchers share their module's name.
"""

from . import apply_residual, rel_l1, store_residual, token_update, trajectory_stats, utils

__all__ = ["apply_residual", "rel_l1", "store_residual", "token_update", "trajectory_stats", "utils"]
