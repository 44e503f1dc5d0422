"""The Latte video arena: a small class-conditional ``diffusers.LatteTransformer3DModel``
trained on *moving digits*, driven by the unmodified ``diffusers.LattePipeline``.

    from omnicache.arena import load_digits_pipeline, digits_inputs, digits_images
    pipe = load_digits_pipeline("latte")
    kw = digits_inputs(pipe, labels=[0, 1, 2, 3])
    out = pipe(**kw, num_inference_steps=28, generator=torch.Generator().manual_seed(0))
    video = digits_images(pipe, out)                # (B, 8, 1, 16, 16) float32 in [0, 1]

The data: one scikit-learn digit (8x8, in [-1, 1]) per clip, moving across a 16x16
canvas (background -1) for 8 frames at a constant velocity of 1 or 2 pixels per frame on
each axis, bouncing off the edges (:func:`moving_digits`).

Conventions (the pipeline's own, nothing patched):

- **No VAE**: the 16x16 canvas *is* the latent (1 channel). ``LattePipeline`` with
  ``vae=None`` uses ``vae_scale_factor = 8``, so ``height = width = 128`` and
  ``video_length = 8``. The transformer embeds 4x4 patches: a token grid of 8 frames x 4 x 4
  (spatial attention over the 16 tokens of a frame, temporal attention over 8 frames).
  ``output_type="latent"`` returns the latents (B, 1, 8, 16, 16); :func:`latte_images`
  maps them to [0, 1].
- **Conditioning** goes through Latte's cross-attention: ``prompt_embeds`` (B, 4, 64) are
  rows of a learned table (one entry per class and a null entry, index 10), shipped as
  ``labels.safetensors``; ``caption_projection`` maps them to the model width, and the
  spatial blocks' ``attn2`` attends to them. No text encoder or tokenizer is loaded.
- **Guidance**: classifier-free guidance as ``LattePipeline`` does it (``guidance_scale >
  1`` with ``negative_prompt_embeds``, here the null entry; trained with 10% label
  dropout): one transformer call per step on the doubled batch.
- **Scheduler**: ``DDIMScheduler`` (linear betas 1e-4..0.02 over 1000 steps, v-prediction,
  trailing timestep spacing, eta 0). The transformer predicts 2 channels (Latte's learned
  sigma layout); the pipeline keeps the first, the v-prediction.
"""

from __future__ import annotations

import math

import torch

from ..io import check_state, read_safetensors
from .flux import (
    LABELS_FILE,
    NULL_LABEL,
    NUM_CLASSES,
    SCHEDULER_FILE,
    TEXT_TOKENS,
    ArenaInfo,
    _arena,
    _labels,
    _read_json,
    arena_dir,
    load_transformer,
    read_guidance,
)

__all__ = ["LATTE_TRANSFORMER_CONFIG", "LATTE_SCHEDULER_CONFIG", "CANVAS", "FRAMES", "moving_digits",
           "latte_inputs", "latte_images", "frame_digits"]

CANVAS = 16  # the latent: 1 x FRAMES x CANVAS x CANVAS
FRAMES = 8
DIGIT = 8
CAPTION_CHANNELS = 64

# Latte's layout (ada_norm_single, gelu-approximate, learned-sigma output) at a small size:
# 2 spatial + 2 temporal blocks, 4 heads of 32 (width 128), 4x4 patches.
LATTE_TRANSFORMER_CONFIG = dict(
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=1,
    out_channels=2,
    num_layers=2,
    cross_attention_dim=128,
    attention_bias=True,
    sample_size=CANVAS,
    patch_size=4,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    caption_channels=CAPTION_CHANNELS,
    video_length=FRAMES,
)

LATTE_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    clip_sample=False,
    set_alpha_to_one=True,
    prediction_type="v_prediction",
    timestep_spacing="trailing",
)


def _reflect(p: torch.Tensor, span: int) -> torch.Tensor:
    """Positions bouncing in ``[0, span]``: the triangle wave of ``p``."""
    period = 2 * span
    q = torch.remainder(p, period)
    return torch.where(q > span, period - q, q)


def moving_digits(digits: torch.Tensor, generator: torch.Generator, frames: int = FRAMES,
                  canvas: int = CANVAS) -> torch.Tensor:
    """Clips ``(B, 1, frames, canvas, canvas)`` in [-1, 1] of the digits ``(B, 1, 8, 8)``
    moving at a random velocity (1 or 2 pixels a frame, either sign, on each axis) from a
    random start, bouncing off the canvas edges; background -1."""
    B = digits.shape[0]
    span = canvas - DIGIT
    start = torch.randint(0, span + 1, (B, 2), generator=generator)
    speed = torch.randint(1, 3, (B, 2), generator=generator)
    sign = torch.randint(0, 2, (B, 2), generator=generator) * 2 - 1
    t = torch.arange(frames)
    pos = _reflect(start[:, None, :] + (speed * sign)[:, None, :] * t[None, :, None], span)  # (B, F, 2)
    out = torch.full((B, 1, frames, canvas, canvas), -1.0, dtype=digits.dtype)
    for b in range(B):
        for f in range(frames):
            y, x = pos[b, f].tolist()
            out[b, 0, f, y:y + DIGIT, x:x + DIGIT] = digits[b, 0]
    return out


def build_latte(name, data_dir, device, dtype):
    from diffusers import DDIMScheduler, LattePipeline, LatteTransformer3DModel

    folder = arena_dir(name, data_dir)
    transformer, config = load_transformer(LatteTransformer3DModel, name, folder, device, dtype)
    scheduler = DDIMScheduler.from_config(_read_json(folder.joinpath(SCHEDULER_FILE), f"{name}/{SCHEDULER_FILE}"))
    pipe = LattePipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=scheduler)

    where = f"{name}/{LABELS_FILE}"
    table = read_safetensors(folder.joinpath(LABELS_FILE), where)
    check_state(table, {"prompt_embeds": torch.empty(NUM_CLASSES + 1, TEXT_TOKENS, config["caption_channels"])},
                where)
    record, scale = read_guidance(name, folder, "guidance_scale")
    pipe.omnicache_arena = ArenaInfo(
        name=name,
        prompt_embeds=table["prompt_embeds"].float(),
        pooled_prompt_embeds=None,
        num_classes=NUM_CLASSES,
        null_label=NULL_LABEL,
        latent_size=config["sample_size"],
        true_cfg_scale=scale,
        record=record,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latte_inputs(pipe, labels, guidance_scale: float | None = None) -> dict:
    """``pipe(...)``'s keyword arguments for clips of the digits ``labels``:
    ``prompt_embeds``, the null entry as ``negative_prompt_embeds``, ``guidance_scale``
    (the arena's default unless given; 1.0 turns guidance off), ``video_length``,
    ``height``/``width`` (the 16x16 latent), ``output_type="latent"``,
    ``mask_feature=False`` and ``negative_prompt=None`` (the embeddings are given, not
    tokenized)."""
    info = _arena(pipe)
    idx = _labels(labels, info.num_classes)
    if guidance_scale is None:
        guidance_scale = info.true_cfg_scale
    if (not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool)
            or not math.isfinite(guidance_scale) or guidance_scale < 1):
        raise ValueError(f"guidance_scale must be a finite number >= 1, got {guidance_scale!r}")
    param = next(pipe.transformer.parameters())
    put = dict(device=param.device, dtype=param.dtype)
    side = info.latent_size * pipe.vae_scale_factor
    kw = dict(
        prompt_embeds=info.prompt_embeds[idx].to(**put),
        guidance_scale=float(guidance_scale),
        video_length=pipe.transformer.config.video_length,
        height=side,
        width=side,
        output_type="latent",
        mask_feature=False,
        negative_prompt=None,  # the pipeline's default "" would need a tokenizer
    )
    if guidance_scale > 1:
        kw["negative_prompt_embeds"] = info.prompt_embeds[torch.full_like(idx, info.null_label)].to(**put)
    return kw


def latte_images(pipe, out) -> torch.Tensor:
    """The frames of ``pipe(**digits_inputs(...))``'s output (the pipeline output, its
    tuple, or the latents (B, 1, F, H, W)): (B, F, 1, H, W) float32 in [0, 1]."""
    _arena(pipe)
    latents = out
    if hasattr(out, "frames"):
        latents = out.frames
    elif isinstance(out, (tuple, list)):
        latents = out[0]
    if not isinstance(latents, torch.Tensor) or latents.dim() != 5:
        raise ValueError(f"out must hold video latents (B, C, frames, height, width), got {type(latents).__name__}"
                         + (f" {tuple(latents.shape)}" if isinstance(latents, torch.Tensor) else ""))
    return ((latents.float().transpose(1, 2) + 1.0) * 0.5).clamp(0.0, 1.0)


def frame_digits(frames: torch.Tensor) -> torch.Tensor:
    """The 8x8 window of most ink of each frame ``(..., 1, H, W)`` in [0, 1] (background
    0): ``(N, 1, 8, 8)`` in [0, 1], N the number of frames, for the digit classifier.
    Ties take the first window in row-major order."""
    x = frames.reshape(-1, 1, *frames.shape[-2:]).float()
    ink = torch.nn.functional.avg_pool2d(x, DIGIT, stride=1)  # (N, 1, H-7, W-7)
    w = ink.shape[-1]
    best = ink.flatten(1).argmax(dim=1)
    ys, xs = (best // w).tolist(), (best % w).tolist()
    return torch.stack([x[n, :, y:y + DIGIT, c:c + DIGIT] for n, (y, c) in enumerate(zip(ys, xs))])
