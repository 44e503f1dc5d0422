"""The model table: video transformers (one :class:`ModelSpec` each, one :class:`BlockIO` per
block class they run; blocks shared with image models, such as ``BasicTransformerBlock``, are
in :mod:`.image`). Branches: Wan's cross-attention ``attn2`` belongs to the attention branch."""

from .spec import E, H, BlockIO, ModelSpec

_T = "temb"

MODELS = {
    "WanTransformer3DModel": ModelSpec(("blocks",)),
    "CogVideoXTransformer3DModel": ModelSpec(("transformer_blocks",)),
    "LatteTransformer3DModel": ModelSpec(
        ("transformer_blocks", "temporal_transformer_blocks"), interleave=True, stack=False,
        temporal=("temporal_transformer_blocks",), grid=lambda c: (c.video_length, *(c.sample_size // c.patch_size,) * 2),
        batch_first=False,
        note="spatial block i, then temporal block i; forward permutes (batch*frames, tokens) <-> (batch*tokens, "
             "frames) around each temporal block, so a residual may not span two blocks"),
    "HunyuanVideoTransformer3DModel": ModelSpec(
        ("transformer_blocks", "single_transformer_blocks"),
        note="the token refiner inside context_embedder runs before these and is not cached"),
    "LTXVideoTransformer3DModel": ModelSpec(("transformer_blocks",)),
}

BLOCKS = {
    "WanTransformerBlock": BlockIO((H,), attn=("attn1", "attn2"), mlp=("ffn",), batched=(H, E, _T)),
    "CogVideoXBlock": BlockIO((H, E), attn=("attn1",), mlp=("ff",), batched=(H, E, _T)),
    "HunyuanVideoTransformerBlock": BlockIO((H, E)),
    "HunyuanVideoSingleTransformerBlock": BlockIO((H, E)),
    # HunyuanVideo image-to-video (image_condition_type="token_replace")
    "HunyuanVideoTokenReplaceTransformerBlock": BlockIO((H, E)),
    "HunyuanVideoTokenReplaceSingleTransformerBlock": BlockIO((H, E)),
    "LTXVideoTransformerBlock": BlockIO((H,)),
}
