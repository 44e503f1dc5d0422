"""Minimal DiT runtime: the model, its presets, the samplers, the cache executor, the engine
protocol on it (:class:`RuntimeEngine`) and the embedded default model."""

from .default import load_classifier, load_default
from .engine import RuntimeEngine
from .model import PRESETS, DiT, DiTBlock, DiTConfig, make_dit
from .samplers import DDIM, FlowEuler, cfg_batch, cfg_combine, cfg_labels, make_sampler, sample

__all__ = [
    "DiT",
    "DiTBlock",
    "DiTConfig",
    "PRESETS",
    "make_dit",
    "FlowEuler",
    "DDIM",
    "make_sampler",
    "cfg_labels",
    "cfg_batch",
    "cfg_combine",
    "sample",
    "load_default",
    "load_classifier",
    "RuntimeEngine",
]
