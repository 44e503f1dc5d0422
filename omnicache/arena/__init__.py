"""Trained diffusers models ("arenas") shipped as package data, driven by the unmodified
diffusers pipeline classes, so every caching system (OmniCache, diffusers' own hooks,
cache-dit) is measured on the same model, seeds and FLOP count.

    from omnicache.arena import load_digits_pipeline, digits_inputs, digits_images
    pipe = load_digits_pipeline("flux")            # diffusers.FluxPipeline, no download
    kw = digits_inputs(pipe, labels=[0, 1, 2, 3])
    out = pipe(**kw, num_inference_steps=28, generator=torch.Generator().manual_seed(0))
    imgs = digits_images(pipe, out)                # (B, 1, 8, 8) float32 in [0, 1]

    pipe = load_digits_pipeline("latte")           # diffusers.LattePipeline: moving digits
    video = digits_images(pipe, pipe(**digits_inputs(pipe, [7]), num_inference_steps=28))
                                                   # (B, 8, 1, 16, 16) frames in [0, 1]

See :mod:`omnicache.arena.flux` and :mod:`omnicache.arena.latte` for the conventions;
``omnicache train-arena {flux,latte}`` retrains.
"""

from .pipelines import ARENAS, digits_images, digits_inputs, load_digits_pipeline

__all__ = ["ARENAS", "load_digits_pipeline", "digits_inputs", "digits_images"]
