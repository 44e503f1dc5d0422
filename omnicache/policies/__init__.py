"""Caching policies: each a ``<Name>Config`` dataclass, validated on construction.

``kind = "static"`` configs build a :class:`~omnicache.plan.CachePlan` before sampling
(``config.plan(steps, blocks, granularity=None)``); ``kind = "dynamic"`` configs build a
per-run decider (``config.decider(steps, blocks, granularity=None)``) that the executor
asks once per step, per sample. A ``CachePlan`` is accepted wherever a config is.

A decider has ``first_blocks`` (blocks computed before deciding), ``ref_every_step``,
``start(batch)``, ``signal(model, h0, h, c) -> Tensor``, ``signal_flops(flops, config)``,
``decide(i, rel) -> list[bool]`` and ``record() -> dict``; see
:mod:`omnicache.runtime.executor`. Dynamic configs have ``mode``: ``"host"`` (the above,
one host sync per step) or ``"device"``, where :class:`omnicache.cache.DeviceDecisions`
drives the decider's device half: ``device_state(samples, device) -> dict``,
``device_forced(step) -> Tensor`` and ``decide_device(rel, forced, state) -> Tensor``.
"""

from ..plan import CachePlan
from .adacache import AdaCacheConfig
from .delta_dit import DeltaDiTConfig
from .first_block_cache import FirstBlockCacheConfig
from .fora import FORAConfig
from .l2c import L2CConfig
from .magcache import MagCacheConfig, fit_magcache_ratios
from .nocache import NoCacheConfig
from .omnicache import OmniCacheConfig
from .pab import PABConfig, TGATEConfig
from .taylorseer import TaylorSeerConfig, forecast_coefficients
from .teacache import TeaCacheConfig, fit_teacache_coefficients
from .toca import ToCaConfig

__all__ = [
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
    "PABConfig",
    "AdaCacheConfig",
    "ToCaConfig",
    "TGATEConfig",
    "fit_teacache_coefficients",
    "fit_magcache_ratios",
    "forecast_coefficients",
]
