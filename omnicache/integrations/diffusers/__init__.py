"""Feature caching for diffusers transformers, over omnicache's cache core.

    from omnicache.integrations import diffusers as oc
    oc.enable(pipe, FORAConfig())              # or a CachePlan, or a dynamic policy
                                               # (per_sample=True: one decision per batch row)
    pipe(...); oc.summary(pipe).compute_fraction
    oc.disable(pipe)

    plan = oc.calibrate(pipe, OmniCacheConfig(compute_fraction=0.5), **pipe_call_kwargs)
    plan = oc.calibrate(pipe, L2CConfig(compute_fraction=0.6), **pipe_call_kwargs)
    cfg = oc.calibrate(pipe, TeaCacheConfig(threshold=0.1), **pipe_call_kwargs)   # its polynomial
    cfg = oc.calibrate(pipe, MagCacheConfig(threshold=0.06), **pipe_call_kwargs)  # its ratios
    plan = omnicache.fit_correction(oc.DiffusersEngine(pipe, **pipe_call_kwargs), any_plan)  # γ on any plan

Split by job: :mod:`.models` (which blocks a model runs, each block class's I/O by name, its
attention/MLP branch submodules and batched arguments), :mod:`.adapter` (one transformer's
block I/O mapped onto the cache core), :mod:`.install` (enable / disable: block and branch
wrappers, forward variants, hooks), :mod:`.engine` (the engine protocol the methods see:
record, replay, the scheduler step's sensitivity, router training).
"""

from ...arena import digits_images, digits_inputs, load_digits_pipeline
from .engine import DiffusersEngine
from .install import _ATTR, adapter_of, disable, enable, reset, summary
from .models import BLOCKS, MODELS, BlockIO, ModelSpec, register

__all__ = ["enable", "disable", "reset", "summary", "adapter_of", "calibrate", "DiffusersEngine", "register",
           "load_digits_pipeline", "digits_inputs", "digits_images", "MODELS", "BLOCKS", "BlockIO", "ModelSpec"]


def calibrate(pipe_or_transformer, config, *, run=None, steps: int | None = None, progress: bool = True,
              **pipe_call_kwargs):
    """Fit ``config`` on this model from the user's own run (:class:`DiffusersEngine`):
    ``OmniCacheConfig`` and ``L2CConfig`` give a :class:`~omnicache.plan.CachePlan` (enable it),
    ``TeaCacheConfig`` the config with its fitted polynomial, ``MagCacheConfig`` the config
    with its magnitude ratios (``config.calibrate(engine)``).

    Args:
        pipe_or_transformer: a diffusers pipeline (its call is the calibration run) or a
            supported transformer driven by ``run``.
        run: for a bare transformer, a function performing one sampling run with it.
        steps: the steps of one run (read from the pipeline's scheduler if None).
        **pipe_call_kwargs: what to call the pipeline with (the calibration inputs, e.g.
            ``prompt_embeds=..., num_inference_steps=28, generator=...``).
    """
    fitted = getattr(type(config), "calibrate", None)
    if not callable(fitted):
        raise TypeError(f"{type(config).__name__} is not fitted on a model: calibrate takes OmniCacheConfig, "
                        f"L2CConfig, TeaCacheConfig or MagCacheConfig (enable the others directly)")
    return config.calibrate(DiffusersEngine(pipe_or_transformer, run=run, steps=steps, progress=progress,
                                            **pipe_call_kwargs))
