"""The setting of a policy whose compute fraction is nearest a target: one search, shared
by ``omnicache eval --compute-fraction`` (:func:`omnicache.evaluate.tune_to_fraction`) and
the comparisons in ``benchmarks/``.

Compute falls as a knob grows (an interval, a threshold, a reused share). ``fraction(knob)``
measures it; every evaluated point is kept in ``memo`` (knob -> fraction, in evaluation
order), which a caller may share across targets so that later ones start from a bracket.
The *band* is ``target ± tolerance``. By the knob's kind (:class:`Knob`):

- ``"int"``: scanned upward from ``lo`` (:func:`scan`), stopping after the first value whose
  fraction is below the band; the nearest scanned value, the first on ties.
- ``"float"``: bisected (:func:`bisect`): the bracket ``[lo, hi]`` is first narrowed by the
  memo (the largest knob above the target, the smallest at or below it); with no point at
  or below the target yet, a ``bounded`` knob tries ``hi`` itself (and stops there if still
  above), an unbounded one tries ``hi`` and, while it stays above, widens ``lo, hi = hi, 4 hi``
  (``widen`` times at most). Then at most ``bisections`` midpoints, stopping once a point
  of the memo lies within ``tolerance / 3``. The nearest point of the memo wins; ties go to
  the first evaluated (``tie="first"``) or the lowest knob (``tie="lowest"``).
- ``"target"``: the knob is the target fraction itself (a plan cut to a FLOP fraction in
  whole steps); it is measured and, outside the band, the knob one ``step`` lower (above the
  target) or higher (below it) is tried too, if within ``(lo, hi]``. The nearest point of the
  memo wins, ties to the knob nearest the target.
- ``"exact"``: the knob is the target, taken as is (nothing measured).

:func:`scan` also serves a finite list of candidate settings whose fractions are known
(the static baselines of ``benchmarks/compare.py``): with a ``score``, the best-scoring
candidate inside the band (the first on ties; the nearest candidate when none is inside).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable

__all__ = ["Knob", "nearest_setting", "scan", "bisect"]

KINDS = ("int", "float", "target", "exact")


@dataclass(frozen=True)
class Knob:
    """A knob's kind (:data:`KINDS`) and range; ``bounded``: a float knob's ``hi`` is a hard
    limit (a share), not the first bracket."""

    kind: str
    lo: float
    hi: float
    bounded: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Knob.kind: one of {', '.join(KINDS)}, got {self.kind!r}")


def _memoised(fraction: Callable, memo: dict) -> Callable:
    def measured(knob):
        if knob not in memo:
            memo[knob] = fraction(knob)
        return memo[knob]
    return measured


def _nearest(memo: dict, target: float, tie: str):
    if tie == "first":  # min() keeps the first of equal keys: the earliest evaluated
        return min(memo, key=lambda k: abs(memo[k] - target))
    if tie == "lowest":
        return min(memo, key=lambda k: (abs(memo[k] - target), k))
    raise ValueError(f"tie: 'first' or 'lowest', got {tie!r}")


def scan(candidates: Iterable[Hashable], fraction: Callable, target: float, tolerance: float, *,
         stop_below: bool = False, score: Callable | None = None):
    """``(choice, number of candidates inside the band)`` over ``candidates`` in order.

    ``stop_below``: stop after the first candidate below the band (fractions fall along
    the list). Without ``score``: the nearest candidate, the first on ties. With it: the
    highest ``score(candidate)`` among those inside the band, evaluated in order (the first
    on ties), or the nearest candidate when none is inside."""
    scored = []
    for c in candidates:
        f = fraction(c)
        scored.append((abs(f - target), c))
        if stop_below and f < target - tolerance:
            break
    inside = [c for d, c in scored if d <= tolerance]
    if score is None or not inside:
        return min(scored, key=lambda dc: dc[0])[1], len(inside)
    best, best_score = None, -math.inf
    for c in inside:
        s = score(c)
        if s > best_score:
            best, best_score = c, s
    return best, len(inside)


def bisect(fraction: Callable, target: float, lo: float, hi: float, tolerance: float, *, memo: dict | None = None,
           bisections: int = 14, widen: int = 0, bounded: bool = False, tie: str = "first"):
    """The float knob in ``[lo, hi]`` nearest ``target`` (see the module docstring)."""
    memo = {} if memo is None else memo
    measured = _memoised(fraction, memo)
    below = [k for k, f in memo.items() if f <= target]
    above = [k for k, f in memo.items() if f > target]
    if above:
        lo = max(lo, max(above))
    if below:
        hi = min(hi, min(below))
    elif bounded:  # the range's end is the last point to try
        if measured(hi) > target:
            return _nearest(memo, target, tie)
    else:
        for _ in range(widen):  # widen until the fraction drops to the target
            if measured(hi) <= target:
                break
            lo, hi = hi, hi * 4
    for _ in range(bisections):
        if any(abs(f - target) <= tolerance / 3 for f in memo.values()):
            break
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if measured(mid) > target else (lo, mid)
    return _nearest(memo, target, tie)


def nearest_setting(fraction: Callable, target: float, knob: Knob, *, tolerance: float = 0.03,
                    memo: dict | None = None, bisections: int = 14, widen: int = 0, tie: str = "first",
                    step: float | None = None):
    """The value of ``knob`` whose ``fraction(value)`` is nearest ``target`` (see the module
    docstring; ``step``: a ``"target"`` knob's quantum, e.g. ``1 / steps``)."""
    memo = {} if memo is None else memo
    measured = _memoised(fraction, memo)
    if knob.kind == "exact":
        return target
    if knob.kind == "int":
        return scan(range(int(knob.lo), int(knob.hi) + 1), measured, target, tolerance, stop_below=True)[0]
    if knob.kind == "float":
        return bisect(fraction, target, knob.lo, knob.hi, tolerance, memo=memo, bisections=bisections, widen=widen,
                      bounded=knob.bounded, tie=tie)
    if step is None:
        raise ValueError("a 'target' knob needs step (the quantum of its fraction)")
    f = measured(target)
    if abs(f - target) > tolerance:  # quantised to whole steps: try one step either way
        alt = target - step if f > target else target + step
        if knob.lo < alt <= knob.hi:
            measured(alt)
    return min(memo, key=lambda k: (abs(memo[k] - target), abs(k - target)))
