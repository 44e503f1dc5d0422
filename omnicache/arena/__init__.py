"""Trained diffusers models ("arenas") shipped as package data, driven by the unmodified
diffusers pipeline classes, so every caching system (OmniCache, diffusers' own hooks,
cache-dit) is measured on the same model, seeds and FLOP count.

    from omnicache.arena import load_digits_pipeline, digits_inputs, digits_images
    pipe = load_digits_pipeline("flux")            # diffusers.FluxPipeline, no download
    kw = digits_inputs(pipe, labels=[0, 1, 2, 3])
    out = pipe(**kw, num_inference_steps=28, generator=torch.Generator().manual_seed(0))
    imgs = digits_images(pipe, out)                # (B, 1, 8, 8) float32 in [0, 1]

See :mod:`omnicache.arena.flux` for the conventions; ``python -m omnicache.arena.train``
retrains.
"""

from .flux import ARENAS, digits_images, digits_inputs, load_digits_pipeline

__all__ = ["ARENAS", "load_digits_pipeline", "digits_inputs", "digits_images"]
