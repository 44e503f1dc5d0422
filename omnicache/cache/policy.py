"""One policy resolution for every engine: a config (or a plan) -> what the engine runs.

A policy config declares its ``kind`` (:mod:`omnicache.policies`):

- ``"static"``: ``config.plan(steps, blocks, granularity)`` is a :class:`CachePlan`;
- ``"calibrated"``: the same, once fitted on the model: ``config.plan(...)`` reads a saved
  plan (``plan_path``), otherwise the engine's ``calibrate(config, steps, granularity)``
  makes it (our runtime calibrates on its calibration batch; an engine without one
  refuses: calibrate first, then pass the plan);
- ``"dynamic"``: ``config.decider(steps, blocks, granularity)`` decides online
  (:mod:`.decisions`);
- ``"token"``: ToCa's token schedule (``config.full_steps(steps)``, ``ratio``,
  ``magnitude_weight``).

A :class:`CachePlan` is accepted wherever a config is. :class:`ResolvedPolicy` is the one
place that reads these declarations; an engine never probes a policy's attributes.
"""

from __future__ import annotations

from ..plan import DEFAULT_BRANCHES, GRANULARITIES, CachePlan
from .units import token_keep

__all__ = ["KINDS", "ResolvedPolicy"]

KINDS = ("static", "calibrated", "dynamic", "token")
FOREVER = 2**31 - 1  # a decider's steps when the engine does not know them yet


class ResolvedPolicy:
    """A policy as an engine runs it.

    Args:
        policy: a :class:`CachePlan`, a policy config (its declared ``kind``), or None (uncached).
        blocks: the model's blocks.
        granularity: overrides the policy's cache unit, if given.
        has_branches: the engine can cache each block's attention / MLP branches (else a
            branch policy with no explicit granularity runs per block, :meth:`CachePlan.to_block`).
        named_branches: the engine caches named branches (``self_attn``, ``cross_attn``, ...);
            else branch plans are projected onto ``("attn", "mlp")`` (:meth:`CachePlan.for_branches`).
        calibrate: ``(config, steps, granularity) -> CachePlan`` for calibrated configs with no
            saved plan; None: such a config is refused (``where`` names the engine).
        check: ``(plan) -> None``, the engine's own checks of a plan (the model it was made for).
        where, model: the engine's and the model's names, for error messages.

    Attributes: ``kind`` (``"static"``, ``"dynamic"`` or ``"token"``), ``name`` (the policy's,
    for summaries), ``granularity`` (the engine's cache unit), ``branches`` (of branch plans).
    """

    def __init__(self, policy, *, blocks: int, granularity: str | None = None, has_branches: bool = True,
                 named_branches: bool = True, calibrate=None, check=None, where: str = "the engine", model: str = ""):
        self.policy, self.blocks, self.calibrate, self.check, self.where = policy, blocks, calibrate, check, where
        self.named_branches = named_branches
        if policy is None:  # uncached: every step computes every block
            declared, self.name, own = "static", "NoCache", "step"
        elif isinstance(policy, CachePlan):
            declared, self.name, own = "static", str(policy.meta.get("policy", "CachePlan")), policy.granularity
        else:
            declared = getattr(type(policy), "kind", None)
            if declared not in KINDS:
                raise TypeError(f"policy must be a CachePlan, a policy config or None, got {type(policy).__name__}")
            self.name, own = type(policy).__name__.removesuffix("Config"), policy.granularity
        if declared == "calibrated" and policy.plan_path is None and calibrate is None:
            raise ValueError(f"{type(policy).__name__} has no plan: calibrate it on this model first "
                             f"({where}: plan = calibrate(model, config, ...), then pass the plan)")
        self.kind = "static" if declared == "calibrated" else declared
        self.override = granularity
        if self.kind == "dynamic":
            self.decider(FOREVER)  # checks the config against the model now (first_blocks, granularity)
            self.granularity = "step"
        elif self.kind == "token":
            self.granularity = "block"
        else:
            g = own if granularity is None else granularity
            if g == "branch" and not has_branches and granularity is None:
                g = "block"  # blocks without declared branches: per block (CachePlan.to_block)
            allowed = GRANULARITIES if has_branches else ("step", "block")
            if g not in allowed:
                raise ValueError(f"{where} supports granularity {', '.join(map(repr, allowed))}"
                                 f"{' on ' + model if model else ''}, got {g!r}")
            self.granularity = g
        # a plan's branch names, or those its config declares (PAB, T-GATE: named branches)
        named = self.granularity == "branch" and named_branches and policy is not None
        self.branches = tuple(policy.branches) if named else DEFAULT_BRANCHES

    # ------------------------------------------------------------------ what runs
    def plan(self, steps: int) -> CachePlan:
        """The static plan for ``steps``, checked against the model (``blocks``, ``check``)."""
        p, g = self.policy, self.granularity
        if p is None:
            plan = CachePlan.full(steps, self.blocks, g)
        elif isinstance(p, CachePlan):
            plan = p
        elif p.kind == "calibrated" and p.plan_path is None:
            plan = self.calibrate(p, steps, self.override)
        else:
            plan = p.plan(steps, self.blocks, granularity=self.override if p.kind == "calibrated" else g)
        if plan.granularity != g:
            if (plan.granularity, g) != ("branch", "block"):
                raise ValueError(f"CachePlan.granularity: plan is {plan.granularity!r}, the engine runs {g!r} "
                                 f"(only a branch plan runs per block: CachePlan.to_block)")
            plan = plan.to_block()
        if plan.steps != steps:
            raise ValueError(f"CachePlan.steps: plan has {plan.steps} steps but sampling runs {steps}")
        if plan.blocks != self.blocks:
            raise ValueError(f"CachePlan.blocks: plan has {plan.blocks} blocks but the model has {self.blocks}")
        if plan.granularity == "branch":
            if not self.named_branches:  # our DiT's blocks: one self-attention and an MLP
                plan = plan.for_branches(DEFAULT_BRANCHES)
            elif tuple(plan.branches) != self.branches:
                raise ValueError(f"CachePlan.branches: the plan has {plan.branches}, the engine was set up for "
                                 f"{list(self.branches)}")
        if self.check is not None:
            self.check(plan)
        return plan

    def decider(self, steps: int):
        """A fresh decider for a run of ``steps`` (:data:`FOREVER` when unknown)."""
        return self.policy.decider(steps, self.blocks, granularity=self.override)

    def full_steps(self, steps: int) -> list[bool]:
        """ToCa: the steps that compute every token."""
        return self.policy.full_steps(steps)

    def token_keep(self, tokens: int) -> int:
        """ToCa: the tokens of ``tokens`` a partial step recomputes (:func:`.units.token_keep`)."""
        return token_keep(self.policy.ratio, tokens)

    @property
    def magnitude_weight(self) -> float:
        """ToCa: the residual magnitude's weight in a token's score."""
        return self.policy.magnitude_weight
