"""Branch plans (``granularity="branch"``: FORA, Learning-to-Cache, PAB, T-GATE) on a diffusers
transformer: the :class:`.runtime.Runtime` method that wraps each branch submodule's
``forward`` (see the runtime's module docstring)."""

from __future__ import annotations

import torch

from ...cache import REUSE, STORE

__all__ = ["BranchMode"]


class BranchMode:
    """Branch plans (mixed into :class:`.runtime.Runtime`)."""

    def branch_forward(self, k, kind, j, orig, module, *args, **kwargs):
        """A branch submodule's ``forward`` (branch ``kind`` of block ``k``, its ``j``-th
        submodule): at a reuse step its cached pre-gate output (``F + γ1 D1 + γ2 D2``, the
        block applies the current gate); at a store step it runs and its output is stored."""
        u = self.nb * k + kind
        act = self.step_actions[u]
        key = (k, kind, j)
        if act == REUSE:
            if isinstance(module, torch.nn.Linear) and not torch.compiler.is_compiling():
                self.skip_count = module  # a Linear branch's own FLOP hook still fires: it counts nothing
            units = self.current.units[u]
            g1 = self.gamma_t if self.use_g1 else None
            g2 = self.gamma2_t if self.use_g2 else None
            n = self.branch_shape[key]
            if n is None:
                return units[(j, 0)].forecast(g1, g2)
            return tuple(units[(j, e)].forecast(g1, g2) if (j, e) in units else None for e in range(n))
        out = orig(*args, **kwargs)
        if act == STORE:
            single = isinstance(out, torch.Tensor)
            if key not in self.branch_shape:
                self.branch_shape[key] = None if single else len(out)
            for e, x in enumerate((out,) if single else out):
                if isinstance(x, torch.Tensor):
                    stats = self._unit(u, (j, e), x).store(x)
                    if j == e == 0:
                        self.stats_out[u] = stats
        return out
