"""Token-wise caching (:class:`omnicache.policies.ToCaConfig`) on a diffusers transformer:
the :class:`.runtime.Runtime` methods for ``kind = "token"``.

Per cache context and block: the cached residual per token ``F`` (rows, tokens, channels)
and each token's staleness. A full step runs the block and stores ``out - in``; a partial
step scores the tokens (:mod:`omnicache.policies.toca`), gathers the top ones
(:func:`omnicache.ops.gather_tokens`), runs the block on them alone and writes the result
with :func:`omnicache.ops.token_update_` (their residual into ``F``; the others' output
``in + F``). The block's other arguments (text tokens, timestep embeddings) keep their rows.
"""

from __future__ import annotations

import math

import torch

from ... import ops

__all__ = ["TokenMode", "TokenCache"]


class TokenCache:
    """One block's per-token cache in one context."""

    def __init__(self):
        self.F = self.stale = None

    def reset(self):
        self.F = self.stale = None

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.F, self.stale) if t is not None)


class TokenMode:
    """ToCa (mixed into :class:`.runtime.Runtime`)."""

    def _token_block(self, k, orig, args, kwargs):
        ctx, bb = self.current, self.bound[k]
        if not bb.io.bare:
            raise TypeError(f"{type(self.config).__name__}: token-wise caching needs blocks that return "
                            f"hidden_states alone; {type(bb.module).__name__} returns {bb.io.returns}")
        cache = ctx.units[k].setdefault("tokens", TokenCache())
        h = bb.inputs(args, kwargs)["hidden_states"]
        full = self.token_full[ctx.step] or cache.F is None or cache.F.shape != h.shape
        if full:
            out = orig(*args, **kwargs)
            cache.F = (out - h).detach()
            cache.stale = torch.zeros(h.shape[:2], dtype=torch.float32, device=h.device)
            return out
        rows, n = h.shape[:2]
        keep = max(1, math.ceil((1.0 - self.config.ratio) * n))
        mag = cache.F.abs().mean(dim=-1, dtype=torch.float32)
        score = cache.stale / cache.stale.amax(dim=1, keepdim=True).clamp_min(1.0) \
            + self.config.magnitude_weight * mag / mag.mean(dim=1, keepdim=True).clamp_min(1e-12)
        # ties toward the lower index: a tiny decreasing ramp (below any real score difference)
        score = score - torch.arange(n, device=h.device, dtype=torch.float32) * 1e-7
        idx = score.topk(keep, dim=1, sorted=True).indices.sort(dim=1).values
        sub = ops.gather_tokens(h.contiguous(), idx)
        args, kwargs = list(args), dict(kwargs)
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = sub
        else:
            args[bb.pos["hidden_states"]] = sub
        values = orig(*args, **kwargs)
        out = ops.token_update_(cache.F, idx, values.contiguous(), h.contiguous())
        cache.stale += 1
        cache.stale.scatter_(1, idx, 0.0)
        return out
