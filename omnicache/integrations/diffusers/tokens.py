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

from ...cache import TokenCache

__all__ = ["TokenMode"]


class TokenMode:
    """ToCa (mixed into :class:`.runtime.Runtime`)."""

    def _token_block(self, k, orig, args, kwargs):
        ctx, bb = self.current, self.bound[k]
        if not bb.io.bare:
            raise TypeError(f"{type(self.config).__name__}: token-wise caching needs blocks that return "
                            f"hidden_states alone; {type(bb.module).__name__} returns {bb.io.returns}")
        cache = ctx.units[k].setdefault("tokens", TokenCache())
        h = bb.inputs(args, kwargs)["hidden_states"]
        if self.token_full[ctx.step] or cache.F is None or cache.F.shape != h.shape:
            return cache.full(orig(*args, **kwargs), h)
        keep = max(1, math.ceil((1.0 - self.config.ratio) * h.shape[1]))

        def run(sub):
            a, kw = list(args), dict(kwargs)
            if "hidden_states" in kw:
                kw["hidden_states"] = sub
            else:
                a[bb.pos["hidden_states"]] = sub
            return orig(*a, **kw)

        return cache.partial(run, h, keep, self.config.magnitude_weight)
