"""Tiny random diffusers transformers and their inputs (CPU, float32)."""
import torch


def _g(seed):
    return torch.Generator().manual_seed(seed)


def dit():
    from diffusers import DiTTransformer2DModel
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                              num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    inputs = lambda x, t: dict(hidden_states=x, timestep=t, class_labels=torch.tensor([1, 3]))
    return m, (2, 4, 8, 8), inputs


def pixart():
    from diffusers import PixArtTransformer2DModel
    m = PixArtTransformer2DModel(sample_size=8, num_layers=3, patch_size=2, attention_head_dim=8,
                                 num_attention_heads=2, in_channels=4, out_channels=8, cross_attention_dim=16,
                                 caption_channels=24)
    enc = torch.randn(2, 5, 24, generator=_g(1))
    inputs = lambda x, t: dict(hidden_states=x, encoder_hidden_states=enc, timestep=t,
                               added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return m, (2, 4, 8, 8), inputs


def flux():
    from diffusers import FluxTransformer2DModel
    m = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
                               attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                               pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    enc, pooled = torch.randn(2, 5, 32, generator=_g(1)), torch.randn(2, 32, generator=_g(2))
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.), torch.arange(4.), indexing="ij"), -1)
    img_ids, txt_ids = img_ids.reshape(-1, 3), torch.zeros(5, 3)
    inputs = lambda x, t: dict(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled,
                               timestep=t, img_ids=img_ids, txt_ids=txt_ids)
    return m, (2, 16, 4), inputs


def sd3():
    from diffusers import SD3Transformer2DModel
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                              num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=32,
                              pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16)
    enc, pooled = torch.randn(2, 5, 32, generator=_g(1)), torch.randn(2, 16, generator=_g(2))
    inputs = lambda x, t: dict(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t)
    return m, (2, 4, 8, 8), inputs


def wan():
    from diffusers import WanTransformer3DModel
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                              out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=3,
                              cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    enc = torch.randn(2, 5, 16, generator=_g(1))
    inputs = lambda x, t: dict(hidden_states=x, timestep=t, encoder_hidden_states=enc)
    return m, (2, 4, 2, 8, 8), inputs


def cogvideox():
    from diffusers import CogVideoXTransformer3DModel
    m = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                    time_embed_dim=4, text_embed_dim=16, num_layers=3, sample_width=8,
                                    sample_height=8, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
                                    max_text_seq_length=5)
    enc = torch.randn(2, 5, 16, generator=_g(1))
    inputs = lambda x, t: dict(hidden_states=x, encoder_hidden_states=enc, timestep=t)
    return m, (2, 3, 4, 8, 8), inputs


def latte():
    from diffusers import LatteTransformer3DModel
    # video_length must equal the frames (temp_pos_embed is added per frame); frames (2) != tokens per
    # frame (16), so a residual taken across the spatial/temporal reshape could not silently broadcast
    m = LatteTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=2, cross_attention_dim=16, sample_size=8, patch_size=2,
                                activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                                caption_channels=16, video_length=2)
    enc = torch.randn(2, 5, 16, generator=_g(1))
    inputs = lambda x, t: dict(hidden_states=x, timestep=t, encoder_hidden_states=enc)
    return m, (2, 4, 2, 8, 8), inputs


def hunyuan_video(image_condition_type=None):
    from diffusers import HunyuanVideoTransformer3DModel
    m = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                       num_layers=2, num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0,
                                       patch_size=2, patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
                                       rope_axes_dim=(2, 2, 4), guidance_embeds=True,
                                       image_condition_type=image_condition_type)
    enc, pooled = torch.randn(2, 5, 16, generator=_g(1)), torch.randn(2, 8, generator=_g(2))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # the second prompt is padded
    guidance = torch.full((2,), 6000.0)
    inputs = lambda x, t: dict(hidden_states=x, timestep=t, encoder_hidden_states=enc, encoder_attention_mask=mask,
                               pooled_projections=pooled, guidance=guidance)
    return m, (2, 4, 2, 8, 8), inputs


def ltx_video():
    from diffusers import LTXVideoTransformer3DModel
    m = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
                                   attention_head_dim=12, cross_attention_dim=24, num_layers=3, caption_channels=16)
    enc = torch.randn(2, 5, 16, generator=_g(1))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    inputs = lambda x, t: dict(hidden_states=x, encoder_hidden_states=enc, timestep=t, encoder_attention_mask=mask,
                               num_frames=2, height=4, width=4)
    return m, (2, 32, 8), inputs  # patchified latents: (batch, frames * height * width, channels)


def qwen_image():
    from diffusers import QwenImageTransformer2DModel
    m = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=3, attention_head_dim=16,
                                    num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6))
    enc = torch.randn(2, 5, 16, generator=_g(1))
    mask = torch.ones(2, 5, dtype=torch.long)
    inputs = lambda x, t: dict(hidden_states=x, encoder_hidden_states=enc, encoder_hidden_states_mask=mask,
                               timestep=t / 1000, img_shapes=[(1, 4, 4)] * 2)
    return m, (2, 16, 16), inputs  # packed latents: (batch, (8/2) * (8/2), 4 * 2 * 2)


def sana():
    from diffusers import SanaTransformer2DModel
    m = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                               num_layers=3, num_cross_attention_heads=2, cross_attention_head_dim=8,
                               cross_attention_dim=16, caption_channels=16, mlp_ratio=2.0, sample_size=8,
                               patch_size=1)
    enc = torch.randn(2, 5, 16, generator=_g(1))
    inputs = lambda x, t: dict(hidden_states=x, encoder_hidden_states=enc, timestep=t)
    return m, (2, 4, 8, 8), inputs


def lumina2():
    from diffusers import Lumina2Transformer2DModel
    m = Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=3,
                                  num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16,
                                  axes_dim_rope=(4, 6, 6), axes_lens=(32, 32, 32), cap_feat_dim=16)
    enc = torch.randn(2, 5, 16, generator=_g(1))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)  # padded: joint sequences differ
    inputs = lambda x, t: dict(hidden_states=x, timestep=t / 1000, encoder_hidden_states=enc,
                               encoder_attention_mask=mask)
    return m, (2, 4, 8, 8), inputs


MODELS = {"DiT": dit, "PixArt": pixart, "Flux": flux, "SD3": sd3, "Wan": wan, "CogVideoX": cogvideox,
          "Latte": latte, "HunyuanVideo": hunyuan_video, "LTXVideo": ltx_video, "QwenImage": qwen_image,
          "Sana": sana, "Lumina2": lumina2}

# variants outside the parametrised tests (their own tests)
EXTRA = {"HunyuanVideoI2V": lambda: hunyuan_video("token_replace")}


def make(name, seed=0):
    torch.manual_seed(seed)
    m, shape, inputs = {**MODELS, **EXTRA}[name]()
    return m.eval(), shape, inputs


def sample(model, shape, inputs, steps, seed=0, fn=None):
    """A small Euler-like loop: x <- x - out / steps; returns the list of outputs."""
    x = torch.randn(shape, generator=_g(seed))
    outs = []
    fn = model if fn is None else fn
    for i in range(steps):
        t = torch.full((shape[0],), 999.0 * (1 - i / steps))
        with torch.no_grad():
            out = fn(**inputs(x, t), return_dict=False)[0]
        outs.append(out)
        x = x - out[:, : shape[1]] / steps
    return outs
