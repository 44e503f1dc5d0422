"""Measuring policies against uncached sampling, as the demo and ``omnicache eval`` do.

One :class:`Bench` fixes the model, labels, sampler, steps, seed and guidance, runs the
uncached reference once, and then measures each policy on the same noise: fidelity to
the uncached samples (PSNR, SSIM), class accuracy of a digit classifier, FLOPs spent
and measured wall time, speedup = uncached wall / cached wall in the same process.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import types
import typing
from dataclasses import dataclass

import torch

from . import metrics
from .api import generate
from .policies import (CachePlan, DeltaDiTConfig, FirstBlockCacheConfig, FORAConfig, L2CConfig, NoCacheConfig,
                       OmniCacheConfig, TaylorSeerConfig, TeaCacheConfig)
from .runtime.engine import RuntimeEngine, calibrate
from .runtime.samplers import make_sampler
from .tuning import Knob, nearest_setting

POLICIES: dict[str, type] = {
    "nocache": NoCacheConfig,
    "fora": FORAConfig,
    "delta-dit": DeltaDiTConfig,
    "teacache": TeaCacheConfig,
    "fbcache": FirstBlockCacheConfig,
    "taylorseer": TaylorSeerConfig,
    "omnicache": OmniCacheConfig,
    "l2c": L2CConfig,
}

# The setting that trades quality for compute, per policy: (field, kind, lower, upper).
# Integer knobs are scanned; float knobs are bisected (compute falls as they grow);
# "exact": the knob is the target itself (omnicache.tuning).
KNOBS: dict[str, tuple[str, str, float, float]] = {
    "fora": ("interval", "int", 1, 12),
    "delta-dit": ("interval", "int", 1, 12),
    "taylorseer": ("interval", "int", 1, 12),
    "teacache": ("threshold", "float", 0.0, 4.0),
    "fbcache": ("threshold", "float", 0.0, 2.0),
    "omnicache": ("compute_fraction", "exact", 0.0, 1.0),  # takes the target itself
    "l2c": ("compute_fraction", "exact", 0.0, 1.0),
}


def _convert(text: str, annotation, name: str):
    """Parse ``text`` as the type of a dataclass field (``int``, ``float``, ``bool``,
    ``str``, tuples of numbers, optionals of those)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if text.lower() == "none":
            return None
        return _convert(text, args[0], name)
    if annotation is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--set {name}={text}: expected true or false")
    if annotation in (int, float, str):
        try:
            return annotation(text)
        except ValueError:
            raise ValueError(f"--set {name}={text}: expected {annotation.__name__}") from None
    if annotation is tuple or origin is tuple:
        try:
            return tuple(float(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"--set {name}={text}: expected comma-separated numbers") from None
    raise ValueError(f"--set {name}: this field cannot be set from the command line")


def make_config(name: str, sets: list[str] | tuple = ()):
    """A policy config from its name and ``key=value`` settings (typed by the fields)."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    cls = POLICIES[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item}: expected key=value")
        if key not in fields:
            raise ValueError(f"--set {key}: {cls.__name__} has no field {key!r} "
                             f"(fields: {', '.join(fields)})")
        kwargs[key] = _convert(value, hints[key], key)
    return cls(**kwargs)


def policy_label(config) -> str:
    if isinstance(config, CachePlan):
        return str(config.meta.get("policy", "plan"))
    name = next((n for n, c in POLICIES.items() if isinstance(config, c)), type(config).__name__)
    path = getattr(config, "plan_path", None)
    if path is not None:  # a saved plan runs, whatever the config's knob says
        return f"{name}(plan={pathlib.PurePath(path).name})"
    knob = KNOBS.get(name)
    if knob is None:
        return name
    value = getattr(config, knob[0])
    return f"{name}({knob[0]}={value:g})" if value is not None else name


def config_dict(config) -> dict:
    if isinstance(config, CachePlan):
        return {"plan": dict(config.meta)}
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def class_acc(classifier, samples: torch.Tensor, labels: torch.Tensor) -> float:
    """Class accuracy of ``generate``'s samples (in [0, 1]); the digit classifier takes
    images in [-1, 1], the range it was trained on."""
    return metrics.class_accuracy(classifier, samples * 2 - 1, labels)


@dataclass
class Bench:
    """A fixed evaluation setting with its uncached reference run."""

    model: torch.nn.Module
    classifier: torch.nn.Module
    labels: torch.Tensor
    steps: int = 50
    sampler: str = "flow"
    seed: int = 0
    guidance: float | None = None
    repeats: int = 1

    def __post_init__(self):
        make_sampler(self.sampler, self.steps)  # validates sampler and steps
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        # Warm-up, so one-time costs stay out of every timed run.
        generate(self.model, self.labels[:2], steps=2, sampler=self.sampler, guidance=self.guidance)
        self.reference = self._run(None)
        self.reference_acc = class_acc(self.classifier, self.reference.samples, self.labels)

    def resolve(self, config):
        """``config`` as what a run takes: a policy fitted on the model (OmniCache, L2C: kind
        ``"calibrated"``) is calibrated once on this bench's setting and its plan kept here,
        with the bench."""
        if config is None or isinstance(config, CachePlan) or config.kind != "calibrated" or config.plan_path is not None:
            return config
        plans = self.__dict__.setdefault("_plans", {})
        if config not in plans:
            plans[config] = calibrate(config, self.model, steps=self.steps, sampler=self.sampler,
                                      guidance=self._guidance)
        return plans[config]

    @property
    def _guidance(self) -> float:
        return self.guidance if self.guidance is not None else getattr(self.model, "default_guidance", 1.0)

    def _run(self, policy):
        """The run with the smallest wall time of ``repeats`` (samples are identical)."""
        policy = self.resolve(policy)
        best = None
        for _ in range(self.repeats):
            r = generate(self.model, self.labels, policy=policy, steps=self.steps, sampler=self.sampler,
                         guidance=self.guidance, seed=self.seed)
            if best is None or r.summary.wall_s < best.summary.wall_s:
                best = r
        return best

    def uncached_row(self) -> dict:
        s = self.reference.summary
        return dict(policy="uncached", config={}, compute_fraction=1.0, tflops=s.flops / 1e12,
                    wall_s=s.wall_s, speedup=1.0, ideal_speedup=1.0, psnr=math.inf, ssim=1.0,
                    class_acc=self.reference_acc, cache_MB=0.0)

    def measure(self, config) -> dict:
        r = self._run(config)
        s = r.summary
        ref = self.reference
        return dict(policy=policy_label(config), config=config_dict(config),
                    compute_fraction=s.compute_fraction, tflops=s.flops / 1e12, wall_s=s.wall_s,
                    speedup=ref.summary.wall_s / s.wall_s, ideal_speedup=1.0 / s.compute_fraction,
                    psnr=float(metrics.psnr(r.samples, ref.samples).mean()),
                    ssim=float(metrics.ssim(r.samples, ref.samples).mean()),
                    class_acc=class_acc(self.classifier, r.samples, self.labels),
                    cache_MB=s.cache_bytes / 2**20, samples=r.samples)

    def compute_fraction(self, config) -> float:
        """Compute fraction of ``config`` on this bench (static plans: one sample suffices)."""
        static = isinstance(config, CachePlan) or config.kind in ("static", "calibrated")
        labels = self.labels[:1] if static else self.labels
        r = generate(self.model, labels, policy=self.resolve(config), steps=self.steps, sampler=self.sampler,
                     guidance=self.guidance, seed=self.seed)
        return r.summary.compute_fraction

    def fit_teacache(self, labels=None, seed: int = 1000) -> tuple:
        """TeaCache's polynomial fitted on this model from a calibration batch that is not
        the evaluation batch (other labels order and seed)."""
        labels = torch.arange(10) if labels is None else labels
        engine = RuntimeEngine(self.model, labels, steps=self.steps, sampler=self.sampler, guidance=self._guidance,
                               seed=seed)
        return TeaCacheConfig().calibrate(engine).coefficients


def tune_to_fraction(bench: Bench, name: str, target: float, sets=(), tolerance: float = 0.03):
    """The config of policy ``name`` whose compute fraction is closest to ``target``:
    integer knobs are scanned, float knobs bisected until within ``tolerance / 3``
    (:func:`omnicache.tuning.nearest_setting`, ties to the first evaluated)."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"--compute-fraction must be in (0, 1], got {target}")
    if name not in KNOBS:
        raise ValueError(f"policy {name!r} has no compute knob; drop --compute-fraction")
    field, kind, lo, hi = KNOBS[name]
    base = make_config(name, sets)

    def with_knob(v):
        return dataclasses.replace(base, **{field: int(v) if kind == "int" else v})

    knob = nearest_setting(lambda v: bench.compute_fraction(with_knob(v)), target, Knob(kind, lo, hi),
                           tolerance=tolerance, bisections=14)
    return with_knob(knob)


COLUMNS = [("policy", "{:<32s}"), ("compute_fraction", "{:>8.3f}"), ("tflops", "{:>8.4f}"),
           ("wall_s", "{:>7.2f}"), ("speedup", "{:>7.2f}"), ("ideal_speedup", "{:>6.2f}"),
           ("psnr", "{:>6.2f}"), ("ssim", "{:>6.4f}"), ("class_acc", "{:>6.3f}")]
HEADERS = ["policy", "compute", "TFLOPs", "wall s", "speedup", "ideal", "PSNR", "SSIM", "acc"]


def format_table(rows: list[dict]) -> str:
    """A fixed-width table of result rows (policy, compute fraction, TFLOPs, wall s,
    measured and ideal speedup, PSNR, SSIM, class accuracy)."""
    widths = [len(fmt.format(0) if "s}" not in fmt else fmt.format("")) for _, fmt in COLUMNS]
    lines = [" ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(HEADERS, widths)))]
    for r in rows:
        lines.append(" ".join(fmt.format(r[k]) for k, fmt in COLUMNS))
    return "\n".join(lines)


def public_row(row: dict) -> dict:
    """A result row for JSON: no tensors, infinities as strings."""
    out = {k: v for k, v in row.items() if k != "samples"}
    return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in out.items()}
