"""The arenas' public entry points: load a trained arena as its unmodified diffusers
pipeline, the call's keyword arguments for given digit classes, and the images (Flux) or
frames (Latte) of the output."""

from __future__ import annotations

import torch

from .flux import _arena, build_flux, flux_images, flux_inputs
from .latte import build_latte, latte_images, latte_inputs

__all__ = ["ARENAS", "load_digits_pipeline", "digits_inputs", "digits_images"]

ARENAS = ("flux", "latte")


def load_digits_pipeline(name: str = "flux", device="cpu", dtype=torch.float32, data_dir=None):
    """The trained digits arena ``name`` as an unmodified diffusers pipeline (no download).

    ``"flux"``: a ``diffusers.FluxPipeline`` (its own ``FlowMatchEulerDiscreteScheduler``,
    no VAE or text encoders) around a small ``FluxTransformer2DModel`` trained on digits.
    ``"latte"``: a ``diffusers.LattePipeline`` (its own ``DDIMScheduler``, no VAE or text
    encoder) around a small ``LatteTransformer3DModel`` trained on moving digits.

    The model is on ``device`` in ``dtype`` (weights ship in float16 and are cast); the
    progress bar is off (``pipe.set_progress_bar_config(disable=False)`` turns it on).
    ``data_dir`` reads the files from another folder (tests, retraining). Use
    :func:`digits_inputs` for the call's arguments and :func:`digits_images` for the
    images."""
    if not isinstance(name, str) or name not in ARENAS:
        raise ValueError(f"name must be one of {', '.join(repr(a) for a in ARENAS)}, got {name!r}")
    build = build_flux if name == "flux" else build_latte
    return build(name, data_dir, device, dtype)


def digits_inputs(pipe, labels, guidance: float | None = None, **kwargs) -> dict:
    """The keyword arguments of ``pipe(...)`` that ask for the digit classes ``labels``
    (ints in 0..9, one sample each), with the arena's default guidance unless ``guidance``
    is given (1.0: none). Add ``num_inference_steps`` and ``generator``.

    Flux: see :func:`omnicache.arena.flux.flux_inputs` (``true_cfg_scale=`` is accepted as
    well); Latte: :func:`omnicache.arena.latte.latte_inputs` (``guidance_scale=``)."""
    info = _arena(pipe)
    key = "true_cfg_scale" if info.name == "flux" else "guidance_scale"
    unknown = sorted(set(kwargs) - {key})
    if unknown:
        raise ValueError(f"digits_inputs: unknown argument {unknown[0]!r} for the {info.name} arena "
                         f"(guidance is 'guidance' or {key!r})")
    if guidance is not None and key in kwargs:
        raise ValueError(f"digits_inputs: pass guidance or {key}, not both")
    guidance = kwargs.get(key, guidance)
    if info.name == "flux":
        return flux_inputs(pipe, labels, true_cfg_scale=guidance)
    return latte_inputs(pipe, labels, guidance_scale=guidance)


def digits_images(pipe, out) -> torch.Tensor:
    """Flux: the images of the output, (B, 1, 8, 8); Latte: its frames, (B, 8, 1, 16, 16);
    float32 in [0, 1]."""
    info = _arena(pipe)
    return flux_images(pipe, out) if info.name == "flux" else latte_images(pipe, out)
