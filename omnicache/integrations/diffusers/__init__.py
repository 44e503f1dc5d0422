"""Feature caching for diffusers transformers, over omnicache's cache core.

    from omnicache.integrations import diffusers as oc
    oc.enable(pipe, FORAConfig())              # or a CachePlan, or a dynamic policy
                                               # (per_sample=True: one decision per batch row)
    pipe(...); oc.summary(pipe).compute_fraction
    oc.disable(pipe)

Split by job: :mod:`.adapters` (which blocks a model runs, each block class's I/O by
name, its attention/MLP branch submodules and batched arguments), :mod:`.runtime`
(per-cache-context state over :mod:`omnicache.cache`), :mod:`.install` (enable / disable:
block and branch wrappers, forward variants, hooks), :mod:`.calibrate` (OmniCache and
TeaCache calibrated on the user's own model).
"""

from ...arena import digits_images, digits_inputs, load_digits_pipeline
from .adapters import BLOCKS, MODELS, SUPPORTED_MODELS, BlockIO, ModelSpec
from .calibrate import DiffusersEngine, calibrate, fit_gamma
from .fitting import fit_magcache, fit_teacache
from .router import train_router
from .install import _ATTR, disable, enable, reset, runtime_of, summary

_runtime = runtime_of  # the name earlier versions exported

__all__ = ["enable", "disable", "reset", "summary", "runtime_of", "calibrate", "fit_gamma", "fit_magcache", "fit_teacache", "train_router", "DiffusersEngine",
           "load_digits_pipeline", "digits_inputs", "digits_images", "SUPPORTED_MODELS", "MODELS", "BLOCKS", "BlockIO", "ModelSpec"]
