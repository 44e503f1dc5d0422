"""The Flux digits arena: a small class-conditional ``diffusers.FluxTransformer2DModel``
trained on scikit-learn's digits, driven by the unmodified ``diffusers.FluxPipeline``.

    from omnicache.arena import load_digits_pipeline, digits_inputs, digits_images
    pipe = load_digits_pipeline("flux")
    kw = digits_inputs(pipe, labels=[0, 1, 2, 3])
    out = pipe(**kw, num_inference_steps=28, generator=torch.Generator().manual_seed(0))
    imgs = digits_images(pipe, out)                 # (B, 1, 8, 8) float32 in [0, 1]

Conventions (the pipeline's own, nothing patched):

- **No VAE**: the 8x8 digit in [-1, 1] *is* the latent (1 channel). ``FluxPipeline`` with
  ``vae=None`` uses ``vae_scale_factor = 8`` and a latent of ``2 * (height // 16)`` rows,
  so ``height = width = 64`` gives the 8x8 latent, packed in 2x2 patches into 16 tokens of
  4 channels (the transformer's ``in_channels``). ``output_type="latent"`` returns the
  packed latents; :func:`digits_images` unpacks them.
- **Conditioning** enters the way Flux takes text: ``prompt_embeds`` (B, 4, 64) and
  ``pooled_prompt_embeds`` (B, 64) are rows of a learned table (one entry per class and a
  null entry, index 10), shipped with the model as ``labels.safetensors``. No text
  encoder or tokenizer is loaded.
- **Guidance**: true classifier-free guidance as ``FluxPipeline`` does it
  (``true_cfg_scale > 1`` with ``negative_prompt_embeds``/``negative_pooled_prompt_embeds``,
  here the null entry; the model was trained with 10% label dropout). The pipeline then
  makes **two transformer calls per step**, under ``transformer.cache_context("cond")``
  and ``cache_context("uncond")``. ``guidance_embeds=False``: the pipeline's
  ``guidance_scale`` is ignored.
- **Scheduler**: ``FlowMatchEulerDiscreteScheduler`` with FLUX.1-dev's dynamic shifting
  settings (``scheduler_config.json``); for 16 image tokens the pipeline's
  ``calculate_shift`` gives mu ~= 0.459 (a time shift of e^mu ~= 1.58). The transformer
  receives ``timestep / 1000`` = sigma, and predicts ``v = noise - x0`` with
  ``x_sigma = (1 - sigma) x0 + sigma noise``.

Files in ``omnicache/data/arena/flux/`` (written by ``omnicache train-arena
flux``): ``config.json`` + ``diffusion_pytorch_model.safetensors`` (diffusers format,
float16; cast on load), ``labels.safetensors``, ``scheduler_config.json``,
``arena.json`` (defaults and the training record). Only JSON and safetensors are read.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import math
import numbers
from pathlib import Path

import torch

from ..io import check_state, read_safetensors

__all__ = [
    "ArenaInfo",
    "build_flux",
    "flux_inputs",
    "flux_images",
    "FLUX_TRANSFORMER_CONFIG",
    "FLUX_SCHEDULER_CONFIG",
]

NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES  # the label table's last row: the unconditional ("negative") entry
LATENT_SIZE = 8  # the digit is the latent: 1 x 8 x 8
TEXT_TOKENS = 4  # tokens per label in prompt_embeds

# A small FLUX.1 layout: 2 double-stream (joint attention) + 4 single-stream blocks,
# 4 heads of 32 (inner dim 128), rotary axes 8 + 12 + 12 = 32 as Flux splits them.
FLUX_TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=4,  # 1 latent channel packed in 2x2 patches
    out_channels=None,
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,
    pooled_projection_dim=64,
    guidance_embeds=False,
    axes_dims_rope=[8, 12, 12],
)

# FLUX.1-dev's scheduler settings (dynamic shifting by image sequence length).
FLUX_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)

ARENA_JSON = "arena.json"
LABELS_FILE = "labels.safetensors"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
CONFIG_FILE = "config.json"
SCHEDULER_FILE = "scheduler_config.json"


@dataclasses.dataclass
class ArenaInfo:
    """What :func:`digits_inputs` needs besides the pipeline's own components; attached to
    the pipeline as ``pipe.omnicache_arena``."""

    name: str
    prompt_embeds: torch.Tensor  # (num_classes + 1, L, joint_attention_dim), float32, CPU
    pooled_prompt_embeds: torch.Tensor | None  # (num_classes + 1, pooled_projection_dim); None: Latte
    num_classes: int
    null_label: int
    latent_size: int
    true_cfg_scale: float  # the default guidance (Flux: true_cfg_scale; Latte: guidance_scale)
    record: dict  # arena.json


def arena_dir(name: str, data_dir=None):
    if data_dir is not None:
        return Path(data_dir)
    return importlib.resources.files("omnicache").joinpath("data", "arena", name)


def _read_json(source, where):
    try:
        obj = json.loads(source.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: top level must be an object")
    return obj


def load_transformer(cls, name, folder, device, dtype):
    """The arena's transformer: ``config.json`` (its ``_class_name`` must be ``cls``'s) and the
    float16 safetensors weights, checked tensor by tensor, cast to ``dtype`` on ``device``,
    in eval mode without gradients."""
    config = _read_json(folder.joinpath(CONFIG_FILE), f"{name}/{CONFIG_FILE}")
    cls_name = config.get("_class_name")
    if cls_name != cls.__name__:
        raise ValueError(f"{name}/{CONFIG_FILE}: field '_class_name' must be '{cls.__name__}', got {cls_name!r}")
    transformer = cls.from_config(config)
    state = read_safetensors(folder.joinpath(WEIGHTS_FILE), f"{name}/{WEIGHTS_FILE}")
    check_state(state, transformer.state_dict(), f"{name}/{WEIGHTS_FILE}")
    transformer.load_state_dict({k: v.float() for k, v in state.items()})
    transformer = transformer.to(device=device)
    if dtype != torch.float32:
        transformer = transformer.to(dtype=dtype)
    return transformer.eval().requires_grad_(False), config


def read_guidance(name, folder, key):
    """``arena.json`` and its default guidance ``key`` (a number >= 1)."""
    record = _read_json(folder.joinpath(ARENA_JSON), f"{name}/{ARENA_JSON}")
    scale = record.get(key)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale < 1:
        raise ValueError(f"{name}/{ARENA_JSON}: field '{key}' must be a number >= 1, got {scale!r}")
    return record, float(scale)


def build_flux(name, data_dir, device, dtype):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    folder = arena_dir(name, data_dir)
    transformer, config = load_transformer(FluxTransformer2DModel, name, folder, device, dtype)

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        _read_json(folder.joinpath(SCHEDULER_FILE), f"{name}/{SCHEDULER_FILE}")
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )

    where = f"{name}/{LABELS_FILE}"
    table = read_safetensors(folder.joinpath(LABELS_FILE), where)
    num_labels = NUM_CLASSES + 1
    expected = {
        "prompt_embeds": torch.empty(num_labels, TEXT_TOKENS, config["joint_attention_dim"]),
        "pooled_prompt_embeds": torch.empty(num_labels, config["pooled_projection_dim"]),
    }
    check_state(table, expected, where)

    record, scale = read_guidance(name, folder, "true_cfg_scale")
    pipe.omnicache_arena = ArenaInfo(
        name=name,
        prompt_embeds=table["prompt_embeds"].float(),
        pooled_prompt_embeds=table["pooled_prompt_embeds"].float(),
        num_classes=NUM_CLASSES,
        null_label=NULL_LABEL,
        latent_size=LATENT_SIZE,
        true_cfg_scale=scale,
        record=record,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _arena(pipe):
    info = getattr(pipe, "omnicache_arena", None)
    if not isinstance(info, ArenaInfo):
        raise ValueError("pipe must be a pipeline from load_digits_pipeline (it has no 'omnicache_arena')")
    return info


def _labels(labels, num_classes):
    if isinstance(labels, torch.Tensor):
        if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(
                f"labels must be a 1-D integer tensor or a list of ints, got {labels.dtype} {tuple(labels.shape)}"
            )
        values = labels.tolist()
    else:
        try:
            values = list(labels)
        except TypeError:
            raise ValueError(f"labels must be a list of ints, got {labels!r}") from None
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
            raise ValueError(f"labels must be ints, got {values!r}")
        values = [int(v) for v in values]
    if not values:
        raise ValueError("labels must not be empty")
    bad = [v for v in values if not 0 <= v < num_classes]
    if bad:
        raise ValueError(f"labels must be in [0, {num_classes - 1}], got {bad[0]}")
    return torch.tensor(values, dtype=torch.long)


def flux_inputs(pipe, labels, true_cfg_scale: float | None = None) -> dict:
    """The keyword arguments of ``pipe(...)`` that ask for the digits ``labels`` (ints in
    0..9, one sample each): ``prompt_embeds``, ``pooled_prompt_embeds``, the null entry as
    ``negative_prompt_embeds``/``negative_pooled_prompt_embeds``, ``true_cfg_scale`` (the
    arena's default unless given; 1.0 turns guidance off: one transformer call per step),
    ``height``/``width`` (64: the 8x8 latent) and ``output_type="latent"``. Add
    ``num_inference_steps`` and ``generator``."""
    info = _arena(pipe)
    idx = _labels(labels, info.num_classes)
    if true_cfg_scale is None:
        true_cfg_scale = info.true_cfg_scale
    if (
        not isinstance(true_cfg_scale, (int, float))
        or isinstance(true_cfg_scale, bool)
        or not math.isfinite(true_cfg_scale)
        or true_cfg_scale < 1
    ):
        raise ValueError(f"true_cfg_scale must be a finite number >= 1, got {true_cfg_scale!r}")
    param = next(pipe.transformer.parameters())
    put = dict(device=param.device, dtype=param.dtype)
    null = torch.full_like(idx, info.null_label)
    kw = dict(
        prompt_embeds=info.prompt_embeds[idx].to(**put),
        pooled_prompt_embeds=info.pooled_prompt_embeds[idx].to(**put),
        height=info.latent_size * pipe.vae_scale_factor,
        width=info.latent_size * pipe.vae_scale_factor,
        output_type="latent",
    )
    if true_cfg_scale > 1:
        kw.update(
            negative_prompt_embeds=info.prompt_embeds[null].to(**put),
            negative_pooled_prompt_embeds=info.pooled_prompt_embeds[null].to(**put),
            true_cfg_scale=float(true_cfg_scale),
        )
    return kw


def flux_images(pipe, out) -> torch.Tensor:
    """The images of ``pipe(**digits_inputs(...))``'s output (the pipeline output, its
    tuple, or the packed latents (B, 16, 4)): (B, 1, 8, 8) float32 in [0, 1]."""
    info = _arena(pipe)
    latents = out
    if hasattr(out, "images"):
        latents = out.images
    elif isinstance(out, (tuple, list)):
        latents = out[0]
    if not isinstance(latents, torch.Tensor) or latents.dim() != 3:
        raise ValueError(f"out must hold packed latents (B, tokens, channels), got {type(latents).__name__}"
                         + (f" {tuple(latents.shape)}" if isinstance(latents, torch.Tensor) else ""))
    side = info.latent_size * pipe.vae_scale_factor
    images = pipe._unpack_latents(latents, side, side, pipe.vae_scale_factor)
    return ((images.float() + 1.0) * 0.5).clamp(0.0, 1.0)
