"""``CachePlan``: a static caching schedule, decided before sampling.

A plan says, for every sampling step ``i``, block ``b`` and branch ``k`` (named by
``branches[k]``; by default ``["attn", "mlp"]``: 0 = attention, 1 = MLP), whether to
compute (``compute[i][b][k] = True``) or to reuse the cache. At a
reuse step the executor adds the cached value ``F`` of the unit plus an optional
forecast from the unit's last computed values::

    F + gamma[i] * D1 + gamma2[i] * D2,   D1 = F_j - F_j',   D2 = D1_j - D1_j'

with ``F_j, F_j', F_j''`` the unit's last three computed values (``D1`` the first
difference, ``D2`` the second). ``gamma = gamma2 = 0`` is plain reuse (FORA, Δ-DiT);
``gamma = k / N`` is first-order forecasting (TaylorSeer order 1) and the OmniCache
noise correction; ``gamma2`` adds the second-order term.

The cache unit is set by ``granularity``: ``"step"`` (one residual for the whole block
stack, so every block and branch of a step shares one decision), ``"block"`` (one
residual per block, both branches share it) or ``"branch"`` (attention and MLP
separately, the pre-gate output with the current step's adaLN gate applied).

**Named branches** (version 2): ``branches`` may instead name the attention kinds apart,
from ``self_attn`` (spatial self-attention), ``cross_attn`` (attention to the text or
class tokens), ``temporal_attn`` (a video model's attention across frames) and ``mlp``,
as PAB and T-GATE cache them. A block that lacks a named branch (a temporal block has no
cross-attention) ignores that entry. :meth:`CachePlan.for_branches` projects a plan onto
the branches a model has (our DiT: ``attn`` = its self-attention, ``mlp``). Version-1
files (no ``branches`` field: ``["attn", "mlp"]``) still load; plans are written as
version 2.

Plans are saved as human-readable JSON and validated on construction and on load: a
bad file raises ``ValueError`` naming the field, e.g. ``CachePlan.compute[3][2]: ...``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import torch

from .io import atomic_write_text

__all__ = ["CachePlan", "GRANULARITIES", "PLAN_VERSION", "DEFAULT_BRANCHES", "BRANCH_NAMES", "model_fingerprint"]

PLAN_VERSION = 2
# the default branches (version 1): one attention branch (every attention submodule) and the MLP
DEFAULT_BRANCHES = ("attn", "mlp")
# named branches (version 2), PAB / T-GATE's units; "attn" stands for all attention kinds at once
BRANCH_NAMES = ("attn", "self_attn", "cross_attn", "temporal_attn", "mlp")
ATTENTION_KINDS = ("self_attn", "cross_attn", "temporal_attn")
GRANULARITIES = ("step", "block", "branch")
# gamma/gamma2 become float32 device scalars: a value float32 cannot hold is refused on load.
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_FIELDS = ("version", "steps", "blocks", "granularity", "branches", "compute", "gamma", "gamma2", "meta")


def model_fingerprint(model, blocks: int | None = None) -> dict:
    """What a plan records of the model it was made for: ``{"class", "blocks", "config"}``,
    ``config`` a short SHA-256 of the model's configuration (a dataclass, a diffusers
    ``FrozenDict`` or a dict), so a plan is never applied silently to another model."""
    import hashlib

    cfg = getattr(model, "config", None)
    if dataclasses.is_dataclass(cfg):
        cfg = dataclasses.asdict(cfg)
    cfg = {k: v for k, v in dict(cfg or {}).items() if not str(k).startswith("_")}
    text = json.dumps(cfg, sort_keys=True, default=str)
    if blocks is None:  # our DiT; engines whose blocks live elsewhere pass the count
        blocks = len(model.blocks)
    return {"class": type(model).__name__, "blocks": int(blocks), "config": hashlib.sha256(text.encode()).hexdigest()[:16]}


def _fail(field: str, message: str):
    raise ValueError(f"CachePlan.{field}: {message}")


def _positive_int(field: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(field, f"must be an int >= 1, got {value!r}")
    return value


def _branch_names(branches) -> list:
    if branches is None:
        return list(DEFAULT_BRANCHES)
    if not isinstance(branches, (list, tuple)) or not branches:
        _fail("branches", f"must be a non-empty list of branch names, got {branches!r:.60}")
    for k, name in enumerate(branches):
        if name not in BRANCH_NAMES:
            _fail(f"branches[{k}]", f"must be one of {', '.join(BRANCH_NAMES)}, got {name!r:.60}")
    if len(set(branches)) != len(branches):
        _fail("branches", f"names must be unique, got {list(branches)}")
    if "attn" in branches and any(n in branches for n in ATTENTION_KINDS):
        _fail("branches", f"'attn' (every attention submodule) cannot be combined with "
                          f"{', '.join(ATTENTION_KINDS)}, got {list(branches)}")
    return list(branches)


def _compute_lists(compute, steps: int, blocks: int, nb: int = 2) -> list:
    """``compute`` as nested lists of Python bools, checked to be ``[steps][blocks][nb]``."""
    if isinstance(compute, torch.Tensor):
        if compute.dtype != torch.bool:
            _fail("compute", f"a tensor must have dtype torch.bool, got {compute.dtype}")
        if tuple(compute.shape) != (steps, blocks, nb):
            _fail("compute", f"must have shape [{steps}, {blocks}, {nb}], got {list(compute.shape)}")
        return compute.tolist()
    if not isinstance(compute, (list, tuple)) or len(compute) != steps:
        _fail("compute", f"must be a list of {steps} steps, got {type(compute).__name__} "
                         f"of length {len(compute) if isinstance(compute, (list, tuple)) else '-'}")
    out = []
    for i, row in enumerate(compute):
        if not isinstance(row, (list, tuple)) or len(row) != blocks:
            _fail(f"compute[{i}]", f"must be a list of {blocks} blocks, got {row!r:.60}")
        out_row = []
        for b, pair in enumerate(row):
            if not isinstance(pair, (list, tuple)) or len(pair) != nb:
                _fail(f"compute[{i}][{b}]", f"must be a list of {nb} bools (one per branch), got {pair!r}")
            for k, v in enumerate(pair):
                if not isinstance(v, bool):
                    _fail(f"compute[{i}][{b}][{k}]", f"must be true or false, got {v!r}")
            out_row.append(list(pair))
        out.append(out_row)
    return out


def _coefficients(field: str, values, steps: int) -> list:
    if values is None:
        return [0.0] * steps
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or len(values) != steps:
        n = len(values) if isinstance(values, (list, tuple)) else "-"
        _fail(field, f"must be a list of {steps} numbers (one per step), got length {n}")
    out = []
    for i, g in enumerate(values):
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g):
            _fail(f"{field}[{i}]", f"must be a finite number, got {g!r}")
        if abs(g) > _FLOAT32_MAX:
            _fail(f"{field}[{i}]", f"must be within float32 range (|value| <= {_FLOAT32_MAX:.8g}), got {g!r}")
        out.append(float(g))
    return out


@dataclasses.dataclass
class CachePlan:
    """Per-step, per-block, per-branch compute/reuse decisions plus forecast coefficients.

    Attributes:
        steps: number of sampling steps (>= 1).
        blocks: number of transformer blocks (>= 1).
        granularity: ``"step"``, ``"block"`` or ``"branch"`` (the cache unit).
        compute: ``[steps][blocks][len(branches)]`` bools, ``True`` = compute; a bool
            tensor of that shape is accepted and converted to lists.
        gamma: per-step coefficient of the first difference ``D1`` at reuse steps
            (0.0 = no correction); None means all zeros.
        gamma2: per-step coefficient of the second difference ``D2``; None = all zeros.
        meta: free-form JSON-serialisable dict (policy name, config, sampler...).
        version: file format version (2; a version-1 plan, without ``branches``, is read
            as ``branches = ["attn", "mlp"]`` and becomes version 2).
        branches: the branch names of ``compute``'s last axis (default ``["attn", "mlp"]``;
            see the module docstring for named branches).
    """

    steps: int
    blocks: int
    granularity: str
    compute: list
    gamma: list | None = None
    gamma2: list | None = None
    meta: dict = dataclasses.field(default_factory=dict)
    version: int = PLAN_VERSION
    branches: list | None = None

    def __post_init__(self):
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version not in (1, 2):
            _fail("version", f"must be 1 or {PLAN_VERSION}, got {self.version!r}")
        if self.version == 1 and self.branches is not None and list(self.branches) != list(DEFAULT_BRANCHES):
            _fail("branches", f"version 1 plans have the branches {list(DEFAULT_BRANCHES)}, got {self.branches!r:.60}")
        self.version = PLAN_VERSION
        self.branches = _branch_names(self.branches)
        _positive_int("steps", self.steps)
        _positive_int("blocks", self.blocks)
        if self.granularity not in GRANULARITIES:
            _fail("granularity", f"must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.granularity != "branch" and self.branches != list(DEFAULT_BRANCHES):
            _fail("branches", f"named branches need granularity 'branch', got {self.granularity!r}")
        self.compute = _compute_lists(self.compute, self.steps, self.blocks, len(self.branches))
        self.gamma = _coefficients("gamma", self.gamma, self.steps)
        self.gamma2 = _coefficients("gamma2", self.gamma2, self.steps)
        if not isinstance(self.meta, dict):
            _fail("meta", f"must be a dict, got {type(self.meta).__name__}")
        try:
            json.dumps(self.meta, allow_nan=False)
        except (TypeError, ValueError) as e:
            _fail("meta", f"must be JSON-serialisable ({e})")
        self._check_consistency()

    def _check_consistency(self):
        nb = len(self.branches)
        seen = [[False] * nb for _ in range(self.blocks)]  # unit computed at least once so far
        for i, row in enumerate(self.compute):
            for b, flags in enumerate(row):
                if self.granularity == "step" and not all(v == row[0][0] for v in flags):
                    _fail(f"compute[{i}][{b}]", f"granularity 'step' needs every block and branch of a step "
                                                f"equal to compute[{i}][0][0] = {row[0][0]}, got {flags}")
                if self.granularity == "block" and len(set(flags)) > 1:
                    _fail(f"compute[{i}][{b}]", f"granularity 'block' needs both branches equal, got {flags}")
                for k, v in enumerate(flags):
                    if not v and not seen[b][k]:
                        _fail(f"compute[{i}][{b}][{k}]", "reuses a cache that no earlier step computed")
                    seen[b][k] = seen[b][k] or v
            if not all(all(flags) for flags in row):
                continue
            if self.gamma[i] != 0.0 or self.gamma2[i] != 0.0:
                _fail(f"gamma[{i}]", "must be 0 at a step that computes every block (nothing is reused)")

    # ------------------------------------------------------------------ builders
    @classmethod
    def full(cls, steps: int, blocks: int, granularity: str = "step", meta: dict | None = None) -> CachePlan:
        """The plan that computes everything (uncached sampling)."""
        compute = [[[True, True] for _ in range(blocks)] for _ in range(steps)]
        return cls(steps, blocks, granularity, compute, meta=dict(meta or {"policy": "NoCache"}))

    def for_branches(self, names=DEFAULT_BRANCHES) -> CachePlan:
        """This plan on a model whose blocks have the branches ``names``: each of them
        computes where any of this plan's branches it stands for computes (``attn``: every
        attention kind; ``self_attn``: itself or ``attn``; ...), and always where this plan
        names none of them (never less compute than planned). γ is kept where every branch
        maps to at most one of this plan's, else dropped (plain reuse). Our DiT's blocks
        have ``("attn", "mlp")`` (its attention is self-attention: a ``cross_attn`` or
        ``temporal_attn`` entry has nothing to act on there)."""
        names = _branch_names(list(names))
        if names == self.branches:
            return self
        if self.granularity != "branch":
            raise ValueError(f"CachePlan.for_branches: a {self.granularity!r} plan has no named branches")

        def sources(name):
            if name == "attn":  # the model's one attention: its self-attention, or all kinds at once
                return [k for k, n in enumerate(self.branches) if n in ("attn", "self_attn")]
            if name in ATTENTION_KINDS:
                return [k for k, n in enumerate(self.branches) if n in (name, "attn")]
            return [k for k, n in enumerate(self.branches) if n == name]

        src = [sources(n) for n in names]
        compute = [[[any(flags[k] for k in ks) if ks else True for ks in src] for flags in row]
                   for row in self.compute]
        keep = all(len(ks) <= 1 for ks in src)
        return CachePlan(self.steps, self.blocks, "branch", compute,
                         gamma=self.gamma if keep else None, gamma2=self.gamma2 if keep else None,
                         meta=dict(self.meta, projected_from=self.branches), branches=names)

    def to_block(self) -> CachePlan:
        """This plan at ``block`` granularity, for engines whose blocks expose no separate
        attention/MLP branches (diffusers): a block computes where either branch computes
        (never less compute than planned). A branch plan's ``gamma``/``gamma2`` were fitted
        on branch caches, so they are dropped (plain reuse)."""
        if self.granularity != "branch":
            return self
        compute = [[[any(flags)] * 2 for flags in row] for row in self.compute]
        return CachePlan(self.steps, self.blocks, "block", compute,
                         meta=dict(self.meta, projected_from="branch"))

    def compute_tensor(self) -> torch.Tensor:
        """``compute`` as a bool tensor ``[steps, blocks, len(branches)]``."""
        return torch.tensor(self.compute, dtype=torch.bool)

    def compute_fraction(self, flops: dict) -> float:
        """FLOPs this plan spends / FLOPs of uncached sampling, from ``model.flops_per_sample()``.

        Per step: ``embed + final`` always; per block, ``block_attn`` / ``block_mlp`` when the
        branch computes; ``block_modulation`` when either branch computes, and always at
        ``branch`` granularity (the current gate is needed to apply a cached branch).
        Named branches are first projected onto our DiT's (:meth:`for_branches`).
        """
        if self.branches != list(DEFAULT_BRANCHES):
            return self.for_branches().compute_fraction(flops)
        spent = 0.0
        for row in self.compute:
            spent += flops["embed"] + flops["final"]
            for attn, mlp in row:
                spent += attn * flops["block_attn"] + mlp * flops["block_mlp"]
                if attn or mlp or self.granularity == "branch":
                    spent += flops["block_modulation"]
        return spent / (self.steps * flops["total"])

    def check_matches(self, model, steps: int) -> None:
        """Raise ``ValueError`` naming the field if this plan does not fit ``model``/``steps``."""
        if self.steps != steps:
            _fail("steps", f"plan has {self.steps} steps but sampling runs {steps}")
        depth = len(model.blocks)
        if self.blocks != depth:
            _fail("blocks", f"plan has {self.blocks} blocks but the model has {depth}")
        self.check_model(model)

    def check_model(self, model, blocks: int | None = None) -> None:
        """Refuse a plan made for another model: ``meta["model"]`` (written by calibration,
        :func:`model_fingerprint`) must name this model's class, block count and config.
        Plans without that record (hand-written, or from model-free policies such as FORA)
        pass. To reuse a plan deliberately on another model, drop ``meta["model"]`` or
        pass ``check_plan=False`` where the engine offers it."""
        made = self.meta.get("model")
        if not made:
            return
        have = model_fingerprint(model, blocks)
        for key in ("class", "blocks", "config"):
            if key in made and made[key] != have[key]:
                _fail(f"meta.model.{key}", f"the plan was made for {made[key]!r}, this model has {have[key]!r} "
                                           f"(a plan is calibrated for one model; recalibrate, or override "
                                           f"deliberately with check_plan=False)")

    def check_scheduler(self, scheduler) -> None:
        """Refuse a plan calibrated under another scheduler class (``meta["scheduler"]``)."""
        made = self.meta.get("scheduler")
        if made and scheduler is not None and type(scheduler).__name__ != made:
            _fail("meta.scheduler", f"the plan was calibrated with {made}, the pipeline has "
                                    f"{type(scheduler).__name__}")

    # ---------------------------------------------------------------------- I/O
    def to_dict(self) -> dict:
        """The fields as plain JSON types: a deep copy, so editing it leaves the plan intact."""
        return copy.deepcopy({name: getattr(self, name) for name in _FIELDS})

    def save(self, path) -> None:
        """Write the plan as JSON: one line per field, one line per step of ``compute``.

        The write is atomic (:mod:`omnicache.io`): a failed save leaves an existing file
        at ``path`` as it was."""
        d = self.to_dict()
        lines = [f"  {json.dumps(k)}: {json.dumps(d[k], allow_nan=False)}" for k in _FIELDS if k not in ("compute", "meta")]
        lines.append(f'  "meta": {json.dumps(d["meta"], allow_nan=False)}')
        rows = ",\n    ".join(json.dumps(row) for row in d["compute"])
        lines.append(f'  "compute": [\n    {rows}\n  ]')
        atomic_write_text(path, "{\n" + ",\n".join(lines) + "\n}\n")

    @classmethod
    def from_dict(cls, d) -> CachePlan:
        if not isinstance(d, dict):
            raise ValueError(f"CachePlan: the top level must be a JSON object, got {type(d).__name__}")
        version = d.get("version")
        if version == 1 and type(version) is int:  # version 1 had no branches: ["attn", "mlp"]
            if "branches" in d:
                _fail("branches", "unknown field in a version-1 plan")
            d = dict(d, branches=None)
        for name in _FIELDS:
            if name not in d:
                _fail(name, "missing")
        for name in d:
            if name not in _FIELDS:
                _fail(name, "unknown field")
        for name in ("gamma", "gamma2"):
            if not isinstance(d[name], list):
                _fail(name, f"must be a list of numbers, got {d[name]!r:.60}")
        return cls(**d)

    @classmethod
    def load(cls, path) -> CachePlan:
        """Read and validate a plan written by :meth:`save`.

        Raises ``ValueError`` naming the file (and the field) for anything that is not a
        valid plan: not UTF-8, not JSON, nested too deeply, a field out of range; a folder
        path is a ``ValueError`` too; a missing file is ``FileNotFoundError``."""
        p = Path(path)
        if p.is_dir():
            raise ValueError(f"CachePlan: {path}: is a folder, expected a plan file (JSON)")
        raw = p.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"CachePlan: {path}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") \
                from None
        try:
            d = json.loads(text)  # NaN/Infinity parse as floats and are refused by field below
        except json.JSONDecodeError as e:
            raise ValueError(f"CachePlan: {path}: not valid JSON ({e})") from None
        except RecursionError:
            raise ValueError(f"CachePlan: {path}: not a plan (JSON nested too deeply)") from None
        try:
            return cls.from_dict(d)
        except RecursionError:  # e.g. a deeply nested meta
            raise ValueError(f"CachePlan: {path}: CachePlan.meta: nested too deeply") from None
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
