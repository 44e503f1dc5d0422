"""Caching policies: each a ``<Name>Config`` dataclass, validated on construction, written
once and run by every engine (:mod:`omnicache.cache.policy` resolves them).

Every config declares its ``kind`` (:class:`.common.PolicyConfig`):

- ``"static"``: ``config.plan(steps, blocks, granularity=None)`` is a
  :class:`~omnicache.plan.CachePlan` (FORA, Δ-DiT, TaylorSeer, PAB, T-GATE, MagCache, NoCache);
- ``"calibrated"``: the plan is fitted on the model, ``config.calibrate(engine)`` through the
  engine protocol (:class:`omnicache.cache.Engine`), or read from ``plan_path`` (OmniCache,
  Learning-to-Cache);
- ``"dynamic"``: ``config.decider(steps, blocks, granularity=None)`` decides online
  (TeaCache, First-Block Cache / DBCache, AdaCache);
- ``"token"``: ToCa's token schedule.

A ``CachePlan`` is accepted wherever a config is. Configs fitted on the user's model
(OmniCache, L2C, TeaCache's polynomial, MagCache's ratios) have ``calibrate(engine)``.

A decider declares ``signal`` (``"residual"``: the first blocks' residual, or
``"modulated_input"``: block 0's timestep-modulated input), ``first_blocks``,
``last_blocks``, ``ref_every_step``, ``motion`` and ``mode`` (``"host"``: one host sync per
step, :class:`omnicache.cache.HostDecisions`; ``"device"`` / ``"device-where"``: none,
:class:`omnicache.cache.DeviceDecisions`), and has ``start(batch)``, ``decide(i, rel) ->
list[bool]``, ``record() -> dict`` and, for the device modes, ``device_state(samples,
device)``, ``device_forced(step)`` and ``decide_device(rel, forced, state)``.
"""

from ..plan import CachePlan
from .adacache import AdaCacheConfig
from .delta_dit import DeltaDiTConfig
from .first_block_cache import FirstBlockCacheConfig
from .fora import FORAConfig
from .l2c import L2CConfig
from .magcache import MagCacheConfig, fit_magcache
from .nocache import NoCacheConfig
from .omnicache import OmniCacheConfig
from .pab import PABConfig, TGATEConfig
from .taylorseer import TaylorSeerConfig, forecast_coefficients
from .teacache import TeaCacheConfig, fit_teacache
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
    "fit_teacache",
    "fit_magcache",
    "forecast_coefficients",
]
