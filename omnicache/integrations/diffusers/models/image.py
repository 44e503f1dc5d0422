"""The model table: image transformers (one :class:`ModelSpec` each, one :class:`BlockIO` per
block class they run). Branches: cross-attention (``attn2`` of PixArt's blocks) belongs to the
attention branch; Flux's double block's ``ff_context`` and SD3's to the MLP branch (the text
stream's MLP); Flux's single block runs ``attn`` and ``proj_mlp`` in parallel, both feeding
``proj_out`` (which, with the gate, is computed every step)."""

from .spec import E, H, BlockIO, ModelSpec

_T = "temb"

MODELS = {
    "DiTTransformer2DModel": ModelSpec(("transformer_blocks",)),
    "PixArtTransformer2DModel": ModelSpec(("transformer_blocks",)),
    "FluxTransformer2DModel": ModelSpec(("transformer_blocks", "single_transformer_blocks")),
    "SD3Transformer2DModel": ModelSpec(("transformer_blocks",)),
    "QwenImageTransformer2DModel": ModelSpec(("transformer_blocks",), norm1="img_norm1"),  # image stream
    "SanaTransformer2DModel": ModelSpec(("transformer_blocks",)),
    "Lumina2Transformer2DModel": ModelSpec(
        ("layers",), note="context_refiner (text tokens) and noise_refiner (image tokens) run first on separate "
                          "streams of other lengths, then forward packs both into one joint sequence: only the "
                          "joint layers are cached"),
}

BLOCKS = {
    "BasicTransformerBlock": BlockIO((H,), attn=("attn1", "attn2"), mlp=("ff",),
                                     batched=(H, "attention_mask", E, "encoder_attention_mask", "timestep",
                                              "class_labels"),
                                     named=(("self_attn", ("attn1",)), ("cross_attn", ("attn2",)), ("mlp", ("ff",)))),
    "FluxTransformerBlock": BlockIO((E, H), attn=("attn",), mlp=("ff", "ff_context"), batched=(H, E, _T)),
    "FluxSingleTransformerBlock": BlockIO((E, H), attn=("attn",), mlp=("proj_mlp",), batched=(H, E, _T)),
    "JointTransformerBlock": BlockIO((E, H), attn=("attn", "attn2"), mlp=("ff", "ff_context"), batched=(H, E, _T)),
    "QwenImageTransformerBlock": BlockIO((E, H)),
    "SanaTransformerBlock": BlockIO((H,)),
    "Lumina2TransformerBlock": BlockIO((H,)),
}
