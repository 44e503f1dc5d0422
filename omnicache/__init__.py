"""OmniCache: fused-kernel feature caching for Diffusion Transformers.

    import omnicache
    model = omnicache.load_default()                       # the embedded digits DiT
    result = omnicache.generate(model, [0, 1, 2], policy=omnicache.FORAConfig())
    result.samples, result.summary.compute_fraction

``omnicache.ops`` holds the fused cache ops, usable alone by other engines.
"""

from . import ops
from .api import GenerateResult, generate
from .plan import CachePlan
from .policies import (DeltaDiTConfig, FirstBlockCacheConfig, FORAConfig, L2CConfig, MagCacheConfig, NoCacheConfig,
                       OmniCacheConfig, TaylorSeerConfig, TeaCacheConfig)
from .runtime.default import load_classifier, load_default

__version__ = "0.1.0"

__all__ = [
    "ops",
    "generate",
    "GenerateResult",
    "load_default",
    "load_classifier",
    "CachePlan",
    "NoCacheConfig",
    "FORAConfig",
    "DeltaDiTConfig",
    "TeaCacheConfig",
    "FirstBlockCacheConfig",
    "TaylorSeerConfig",
    "OmniCacheConfig",
    "L2CConfig",
    "MagCacheConfig",
]
