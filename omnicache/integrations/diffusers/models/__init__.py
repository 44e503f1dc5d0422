"""Declarative block adapters: which blocks a diffusers transformer runs, and each block
class's inputs and outputs by name.

Adding a model is one :data:`MODELS` entry (its ``ModuleList`` attributes, in the order
its ``forward`` runs them), plus a :data:`BLOCKS` entry for each new block class: which
streams it takes (``hidden_states`` and, for joint-attention blocks,
``encoder_hidden_states``) and what it returns, by name and position; optionally its
*branches* (the attention and MLP submodules whose pre-gate outputs ``granularity="branch"``
caches) and the ``forward`` arguments that carry the batch dimension (per-sample mode).
"""

from __future__ import annotations

import dataclasses
import inspect

import torch

__all__ = ["BlockIO", "ModelSpec", "MODELS", "BLOCKS", "model_blocks", "model_grid", "BoundBlock"]

H, E = "hidden_states", "encoder_hidden_states"


@dataclasses.dataclass(frozen=True)
class BlockIO:
    """A block class's streams. ``returns``: the names of what ``forward`` returns, in order;
    a single name means it returns that tensor alone. ``cached``: the streams whose residual
    is cached (each must be both an input and an output).

    ``attn`` / ``mlp``: the attribute names of the submodules forming the block's attention
    branch (``k = 0`` of a plan) and MLP branch (``k = 1``); their outputs are taken BEFORE the
    block applies its adaLN gate, so ``granularity="branch"`` caches them and the block's own
    code applies the current step's gate. A missing or ``None`` attribute (PixArt's ``attn2``
    on DiT) is skipped. Empty (the default): the block has no branches and branch plans run
    projected to ``block`` (:meth:`CachePlan.to_block`).

    ``named``: the submodules of each named branch (:data:`omnicache.plan.BRANCH_NAMES`:
    ``self_attn``, ``cross_attn``, ``mlp``) for plans over named branches (PAB, T-GATE); a
    block in one of its model's ``temporal`` lists reports its ``self_attn`` as
    ``temporal_attn``. Empty: ``self_attn`` is the attention branch, ``mlp`` the MLP branch.

    ``batched``: the ``forward`` arguments whose first dimension is the batch (per-sample
    decisions run a sub-batch of them through the block); arguments not named (rotary
    embeddings, ``*_kwargs``) are passed unchanged. ``None`` (the default): undeclared, and
    ``enable(..., per_sample=True)`` is refused for the model."""

    returns: tuple[str, ...] = (H,)
    attn: tuple[str, ...] = ()
    mlp: tuple[str, ...] = ()
    batched: tuple[str, ...] | None = None
    named: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def cached(self) -> tuple[str, ...]:
        return tuple(n for n in (H, E) if n in self.returns)

    @property
    def bare(self) -> bool:
        return len(self.returns) == 1

    @property
    def has_branches(self) -> bool:
        return bool(self.attn) and bool(self.mlp)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """``blocks``: the ``ModuleList`` attributes, in the order ``forward`` runs them;
    ``interleave``: ``forward`` alternates between the lists (block ``i`` of each in turn)
    instead of running them one after the other; ``stack``: one residual may span several
    blocks (False where ``forward`` reshapes between blocks, so ``step`` plans run per block);
    ``norm1``: the attribute of the first block whose output TeaCache measures;
    ``temporal``: the block lists whose self-attention attends across frames (named branch
    ``temporal_attn``); ``grid``: the model config -> the ``(frames, rows, columns)`` token grid
    of a video model whose blocks lay out ``(batch x frames, rows x columns)`` /
    ``(batch x rows x columns, frames)``, for stage-aware filtering (None: no grid)."""

    blocks: tuple[str, ...]
    interleave: bool = False
    stack: bool = True
    norm1: str = "norm1"
    temporal: tuple[str, ...] = ()
    grid: object = None


MODELS: dict[str, ModelSpec] = {
    "DiTTransformer2DModel": ModelSpec(("transformer_blocks",)),
    "PixArtTransformer2DModel": ModelSpec(("transformer_blocks",)),
    "FluxTransformer2DModel": ModelSpec(("transformer_blocks", "single_transformer_blocks")),
    "SD3Transformer2DModel": ModelSpec(("transformer_blocks",)),
    "WanTransformer3DModel": ModelSpec(("blocks",)),
    "CogVideoXTransformer3DModel": ModelSpec(("transformer_blocks",)),
    # spatial block i, then temporal block i; forward permutes (batch*frames, tokens) <-> (batch*tokens, frames)
    # around each temporal block, so a residual may not span two blocks
    "LatteTransformer3DModel": ModelSpec(("transformer_blocks", "temporal_transformer_blocks"),
                                         interleave=True, stack=False, temporal=("temporal_transformer_blocks",),
                                         grid=lambda c: (c.video_length, *(c.sample_size // c.patch_size,) * 2)),
    # the token refiner inside context_embedder runs before these and is not cached
    "HunyuanVideoTransformer3DModel": ModelSpec(("transformer_blocks", "single_transformer_blocks")),
    "LTXVideoTransformer3DModel": ModelSpec(("transformer_blocks",)),
    "QwenImageTransformer2DModel": ModelSpec(("transformer_blocks",), norm1="img_norm1"),  # image stream
    "SanaTransformer2DModel": ModelSpec(("transformer_blocks",)),
    # context_refiner (text tokens) and noise_refiner (image tokens) run first on separate streams of other
    # lengths, then forward packs both into one joint sequence: only the joint ``layers`` are cached
    "Lumina2Transformer2DModel": ModelSpec(("layers",)),
}

# Branches: cross-attention (``attn2`` of PixArt's and Wan's blocks) belongs to the attention
# branch; Flux's double block's ``ff_context`` and SD3's to the MLP branch (the text stream's MLP);
# Flux's single block runs ``attn`` and ``proj_mlp`` in parallel, both feeding ``proj_out``
# (which, with the gate, is computed every step).
_T = "temb"
BLOCKS: dict[str, BlockIO] = {
    "BasicTransformerBlock": BlockIO((H,), attn=("attn1", "attn2"), mlp=("ff",),
                                     batched=(H, "attention_mask", E, "encoder_attention_mask", "timestep",
                                              "class_labels"),
                                     named=(("self_attn", ("attn1",)), ("cross_attn", ("attn2",)), ("mlp", ("ff",)))),
    "WanTransformerBlock": BlockIO((H,), attn=("attn1", "attn2"), mlp=("ffn",), batched=(H, E, _T)),
    "FluxTransformerBlock": BlockIO((E, H), attn=("attn",), mlp=("ff", "ff_context"), batched=(H, E, _T)),
    "FluxSingleTransformerBlock": BlockIO((E, H), attn=("attn",), mlp=("proj_mlp",), batched=(H, E, _T)),
    "JointTransformerBlock": BlockIO((E, H), attn=("attn", "attn2"), mlp=("ff", "ff_context"),
                                     batched=(H, E, _T)),
    "CogVideoXBlock": BlockIO((H, E), attn=("attn1",), mlp=("ff",), batched=(H, E, _T)),
    "HunyuanVideoTransformerBlock": BlockIO((H, E)),
    "HunyuanVideoSingleTransformerBlock": BlockIO((H, E)),
    # HunyuanVideo image-to-video (image_condition_type="token_replace")
    "HunyuanVideoTokenReplaceTransformerBlock": BlockIO((H, E)),
    "HunyuanVideoTokenReplaceSingleTransformerBlock": BlockIO((H, E)),
    "LTXVideoTransformerBlock": BlockIO((H,)),
    "QwenImageTransformerBlock": BlockIO((E, H)),
    "SanaTransformerBlock": BlockIO((H,)),
    "Lumina2TransformerBlock": BlockIO((H,)),
}

class BoundBlock:
    """One block of a model with its I/O spec: reads its streams from a call's arguments
    and packs new values into what the block returns."""

    def __init__(self, module: torch.nn.Module, io: BlockIO, temporal: bool = False):
        self.module, self.io, self.temporal = module, io, temporal
        params = list(inspect.signature(type(module).forward).parameters)[1:]  # skip self
        self.pos = {n: params.index(n) if n in params else None for n in (H, E, *(io.batched or ()))}

    def inputs(self, args, kwargs) -> dict:
        """``{stream name: tensor or None}`` for the cached streams of this call."""
        out = {}
        for n in self.io.cached:
            if n in kwargs:
                out[n] = kwargs[n]
            elif self.pos[n] is not None and self.pos[n] < len(args):
                out[n] = args[self.pos[n]]
            else:
                out[n] = None
        return out

    def outputs(self, out) -> dict:
        """``{stream name: tensor or None}`` from what the block returned."""
        if self.io.bare:
            return {self.io.returns[0]: out}
        return dict(zip(self.io.returns, out))

    def pack(self, values: dict):
        """What the block would return, from ``{stream name: tensor}``."""
        if self.io.bare:
            return values[self.io.returns[0]]
        return tuple(values.get(n) for n in self.io.returns)

    def branch_attrs(self, name: str) -> tuple:
        """The submodule attributes of branch ``name`` (:data:`omnicache.plan.BRANCH_NAMES`)."""
        if name == "attn":
            return self.io.attn
        if name == "mlp" and not self.io.named:
            return self.io.mlp
        named = dict(self.io.named)
        if not named:  # undeclared: the attention branch is the self-attention
            named = {"self_attn": self.io.attn}
        if name == "temporal_attn":
            return named.get("self_attn", ()) if self.temporal else ()
        if name == "self_attn" and self.temporal:
            return ()
        return named.get(name, ())

    def branches(self, names=("attn", "mlp")) -> list:
        """``[(kind, j, submodule)]``: ``kind`` the index of the branch in ``names`` (by
        default 0 = attention, 1 = MLP); ``j`` the submodule's index within its branch
        (missing or ``None`` attributes skipped)."""
        out = []
        for kind, attrs in enumerate(self.branch_attrs(n) for n in names):
            for j, name in enumerate(attrs):
                sub = getattr(self.module, name, None)
                if isinstance(sub, torch.nn.Module):
                    out.append((kind, j, sub))
        return out

    def sub_batch(self, args, kwargs, rows: torch.Tensor, batch: int):
        """``(args, kwargs)`` with every ``batched`` argument's rows ``rows`` (``index_select``
        on dim 0); a batch dimension of 1 broadcasts and is passed unchanged."""
        args, kwargs = list(args), dict(kwargs)
        for n in self.io.batched or ():
            if n in kwargs:
                holder, key = kwargs, n
            elif self.pos.get(n) is not None and self.pos[n] < len(args):
                holder, key = args, self.pos[n]
            else:
                continue
            x = holder[key]
            if not isinstance(x, torch.Tensor) or x.ndim == 0 or x.shape[0] == 1 and batch != 1:
                continue
            if x.shape[0] != batch:
                raise ValueError(f"omnicache: {type(self.module).__name__}.{n} has first dimension "
                                 f"{x.shape[0]}, declared batched (batch {batch})")
            holder[key] = x.index_select(0, rows)
        return tuple(args), kwargs


def model_grid(transformer):
    """The token grid of a supported video transformer (:attr:`ModelSpec.grid`), or None."""
    spec = MODELS.get(type(transformer).__name__)
    return None if spec is None or spec.grid is None else tuple(spec.grid(transformer.config))


def model_blocks(transformer) -> list[BoundBlock]:
    """The blocks of a supported transformer in the order its ``forward`` runs them."""
    cls = type(transformer).__name__
    spec = MODELS.get(cls)
    if spec is None:
        raise TypeError(f"omnicache.integrations.diffusers does not support {cls}; "
                        f"supported: {', '.join(MODELS)}")
    lists = [[(blk, name in spec.temporal) for blk in getattr(transformer, name)] for name in spec.blocks]
    if spec.interleave:
        modules = [blk for group in zip(*lists) for blk in group]
    else:
        modules = [blk for group in lists for blk in group]
    out = []
    for blk, temporal in modules:
        bname = type(blk).__name__
        if bname not in BLOCKS:
            raise TypeError(f"omnicache: block class {bname} of {cls} is not supported "
                            f"(supported blocks: {', '.join(BLOCKS)})")
        out.append(BoundBlock(blk, BLOCKS[bname], temporal))
    return out
