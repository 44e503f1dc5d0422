"""OmniCache: fused-kernel feature caching for Diffusion Transformers.

    import omnicache
    model = omnicache.load_default()                       # the embedded digits DiT
    result = omnicache.generate(model, [0, 1, 2], policy=omnicache.FORAConfig())
    result.samples, result.summary.compute_fraction

``omnicache.ops`` holds the fused cache ops, usable alone by other engines.
``omnicache.fit_correction(engine, plan)`` fits OmniCache's cache-noise correction on any plan
through any engine (:class:`omnicache.cache.Engine`).

The names below are imported on first access (PEP 562), so ``import omnicache.ops``
loads the op layer alone: not the runtime, the policies or the integrations.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Each public name -> the module it comes from ("ops" is the submodule itself).
_SOURCES = {
    "ops": ".ops",
    "generate": ".api",
    "GenerateResult": ".api",
    "load_default": ".runtime.default",
    "load_classifier": ".runtime.default",
    "CachePlan": ".plan",
    "NoCacheConfig": ".policies",
    "FORAConfig": ".policies",
    "DeltaDiTConfig": ".policies",
    "TeaCacheConfig": ".policies",
    "FirstBlockCacheConfig": ".policies",
    "TaylorSeerConfig": ".policies",
    "OmniCacheConfig": ".policies",
    "L2CConfig": ".policies",
    "MagCacheConfig": ".policies",
    "PABConfig": ".policies",
    "TGATEConfig": ".policies",
    "ToCaConfig": ".policies",
    "AdaCacheConfig": ".policies",
    "fit_correction": ".policies.omnicache.correction",
}

__all__ = list(_SOURCES)


def __getattr__(name: str):
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(source, __name__)
    value = module if name == "ops" else getattr(module, name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
