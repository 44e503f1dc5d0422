"""The cache core: what every engine (our runtime, diffusers transformers, yours) calls.

- :mod:`.units`: a plan's per-step actions, the per-unit buffers (:class:`CacheUnit`:
  store / store_rows / reuse / forecast, through :mod:`omnicache.ops`), ToCa's per-token
  caches;
- :mod:`.decisions`: dynamic decisions on the host or on the device, written once
  (:class:`HostDecisions`, :class:`DeviceDecisions`, :func:`compute_or_reuse`);
- :mod:`.policy`: one resolution of a policy into what an engine runs (:class:`ResolvedPolicy`);
- :mod:`.session`: the per-context caching state an engine drives (:class:`CacheSession`);
- :mod:`.summary`: FLOPs from decisions (:func:`spent_flops`) and the one :class:`RunSummary`;
- :mod:`.engine`: the protocol a method (calibration, router training, fits) sees an engine
  through (:class:`Engine`).
"""

from .decisions import (DeviceDecisions, HostDecisions, compute_or_reuse, per_sample_rel, relative_change,
                        relative_change_device, select_rows)
from .engine import Engine, Recording, Replay
from .policy import KINDS, ResolvedPolicy
from .session import CacheContext, CacheSession
from .summary import Costs, RunSummary, linear_flops, spent_flops
from .units import COMPUTE, REUSE, STORE, CacheUnit, TokenCache, plan_order, token_keep, unit_actions

__all__ = ["COMPUTE", "STORE", "REUSE", "unit_actions", "plan_order", "CacheUnit", "TokenCache", "token_keep",
           "relative_change", "relative_change_device", "per_sample_rel", "select_rows", "compute_or_reuse",
           "HostDecisions", "DeviceDecisions", "KINDS", "ResolvedPolicy", "CacheContext", "CacheSession", "Costs",
           "spent_flops", "linear_flops", "RunSummary", "Engine", "Recording", "Replay"]
