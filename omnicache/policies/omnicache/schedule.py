"""OmniCache's trajectory-oriented schedule: the math, with no model and no executor.

Calibration records one uncached sampling run; these functions turn it into a plan:

1. :func:`curvature` (or :func:`curvature_pca3`): how sharply the sampling trajectory
   turns at each step, from ``omnicache.ops.trajectory_stats``;
2. :func:`budget_for_compute_fraction` and :func:`plan_reuse_steps`: the exact dynamic
   programme that places a fixed number of reuse steps where the cost (curvature, or a
   measured reuse error) is lowest, under warmup / tail / run-length constraints;
3. :func:`fit_gamma` / :func:`fit_gammas`: the least-squares γ of the cache-noise
   correction ``hidden += R_j + γ_t (R_j - R_prev)`` at each reuse step;
4. :func:`reuse_error`: how far the reuse estimate is from the true residual;
5. :func:`filter_delta`: optional stage-aware FFT filtering of the drift ``R_j - R_prev``
   over the token grid (low-pass early, high-pass late).

Indexing used throughout: a run of ``N`` steps has latents ``x[0..N]`` (``x[0]`` the
initial noise, ``x[N]`` the clean sample; the paper writes them ``x_N … x_0``) and
step ``i`` (``0 <= i < N``) maps ``x[i]`` to ``x[i+1]`` with residual ``R_i``. A
*compute schedule* is a list of ``N`` bools, ``True`` where the step is computed.

Everything here runs at calibration time: host synchronisation is fine.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from ... import ops
from ...filters import filter_delta
from .fit import fit_gamma, fit_gamma2, fit_gammas, fit_gammas2, reuse_error

__all__ = [
    "curvature",
    "curvature_pca3",
    "plan_reuse_steps",
    "max_reuse_steps",
    "budget_for_compute_fraction",
    "compute_schedule",
    "plan_reuse_steps_in_context",
    "fit_gamma",
    "fit_gammas",
    "fit_gamma2",
    "fit_gammas2",
    "reuse_error",
    "filter_delta",
]

EPS = 1e-12


# ------------------------------------------------------------------- curvature
def _points(latents: Sequence[Tensor] | Tensor, name: str = "latents") -> list[Tensor]:
    if isinstance(latents, Tensor):
        if latents.dim() < 2:
            raise ValueError(f"{name} as one tensor must be [steps + 1, B, ...], got shape {list(latents.shape)}")
        latents = latents.unbind(0)
    points = list(latents)
    if len(points) < 3:
        raise ValueError(f"{name} needs at least 3 points (2 steps) to define a turning angle, got {len(points)}")
    return points


def _cos_from_stats(stats: Tensor, eps: float) -> Tensor:
    """cos of the angle between v1 and v0 from ``[B, 3]`` stats (float64, clamped to [-1, 1])."""
    s = stats.double()
    denom = (s[:, 0] * s[:, 1]).sqrt()
    # A zero-length displacement has no direction: cos = 0 there (κ = 1), never NaN.
    return torch.where(denom > eps, s[:, 2] / denom.clamp_min(eps), torch.zeros_like(denom)).clamp(-1.0, 1.0)


def _step_curvature(points: list[Tensor], per_sample: bool, eps: float) -> Tensor:
    """κ at every interior point, mapped to steps (see :func:`curvature`)."""
    kappa_points = []  # interior points 1 .. N-1, each [B]
    for k in range(1, len(points) - 1):
        stats = ops.trajectory_stats(points[k + 1], points[k], points[k - 1])
        kappa_points.append(1.0 - _cos_from_stats(stats, eps))
    kappa = torch.stack(kappa_points, dim=1)  # [B, N-1]: column c is point c + 1
    kappa = torch.cat([kappa[:, :1], kappa], dim=1)  # [B, N]: step i -> point max(i, 1)
    kappa = kappa.float()
    return kappa if per_sample else kappa.mean(0)


def curvature(latents: Sequence[Tensor] | Tensor, *, per_sample: bool = False, eps: float = EPS) -> Tensor:
    """Turning of the sampling trajectory at each step.

    For latents ``x[0..N]`` (``x[0]`` the noise; step ``i`` maps ``x[i]`` to ``x[i+1]``)
    the curvature at an interior point ``k`` (``1 <= k <= N-1``) is, per sample,

    .. math::

        κ_k = 1 - \\frac{⟨v_1, v_0⟩}{‖v_1‖ ‖v_0‖},\\quad v_1 = x[k+1] - x[k],\\ v_0 = x[k] - x[k-1]

    (0 on a straight line, 1 at a right angle, 2 for a reversal), from
    ``ops.trajectory_stats(x[k+1], x[k], x[k-1])``. A zero-length displacement has no
    direction: its cos is taken as 0 (κ = 1), never NaN.

    Step ``i`` gets the turn *entering* it, ``κ_step[i] = κ_{max(i, 1)}``: the angle
    between step ``i``'s displacement and step ``i-1``'s, which is what reusing step
    ``i-1``'s output at step ``i`` ignores. Step 0 has no previous step and takes the
    nearest defined value, ``κ_1``.

    Parameters
    ----------
    latents
        ``N + 1 >= 3`` tensors ``[B, ...]`` (float32/float16/bfloat16), or one tensor
        ``[N + 1, B, ...]``.
    per_sample
        Return ``[B, N]`` instead of the batch mean ``[N]``.
    eps
        Product ``‖v_1‖²‖v_0‖²`` at or below which a displacement counts as zero.

    Returns
    -------
    Tensor
        float32 ``[N]`` (mean over the batch of the per-sample κ), or ``[B, N]``.
    """
    return _step_curvature(_points(latents), per_sample, eps)


def curvature_pca3(latents: Sequence[Tensor] | Tensor, *, components: int = 3, per_sample: bool = False,
                   eps: float = EPS) -> Tensor:
    """:func:`curvature` measured on the trajectory projected to its top principal components.

    Per sample ``b``, the flattened points form ``X_b`` (``[N + 1, D]``). They are
    centred over time, ``X_c = X_b - mean_k X_b[k]``, and replaced by their scores on
    the top ``components`` principal directions, ``P = U[:, :c] · diag(S[:c])`` from the
    deterministic SVD ``X_c = U S V^T`` (float64, ``torch.linalg.svd``; sign flips of the
    singular vectors are reflections and leave angles unchanged). κ is then computed
    from ``P`` exactly as in :func:`curvature`. A trajectory that lies in an affine
    subspace of dimension ``<= components`` keeps its exact geometry, so its curvature
    is unchanged; otherwise the projection keeps the dominant, smooth turns and drops
    the small high-dimensional wiggle.

    Parameters
    ----------
    latents
        As in :func:`curvature`.
    components
        Number of principal components kept (default 3), ``>= 1``.
    per_sample, eps
        As in :func:`curvature`.

    Returns
    -------
    Tensor
        float32 ``[N]`` or ``[B, N]``.
    """
    if isinstance(components, bool) or not isinstance(components, int) or components < 1:
        raise ValueError(f"components must be an int >= 1, got {components!r}")
    points = _points(latents)
    traj = torch.stack([p.reshape(p.shape[0], -1) for p in points], dim=1).double()  # [B, N+1, D]
    traj = traj - traj.mean(dim=1, keepdim=True)
    u, s, _ = torch.linalg.svd(traj, full_matrices=False)  # u: [B, N+1, r], s: [B, r]
    c = min(components, s.shape[1])
    proj = (u[:, :, :c] * s[:, None, :c]).float()  # [B, N+1, c]
    return _step_curvature(list(proj.unbind(1)), per_sample, eps)


# -------------------------------------------------------------------- schedule
def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    return value


def max_reuse_steps(steps: int, *, warmup: int, tail: int, max_consecutive: int) -> int:
    """Most reuse steps the constraints allow: ``L - ⌊L / (M + 1)⌋`` for a window of
    ``L = steps - warmup - tail`` steps (runs of ``M = max_consecutive`` reuse steps,
    each followed by one computed step)."""
    window = max(steps - warmup - tail, 0)
    return window - window // (max_consecutive + 1)


def _exact_costs(cost: Sequence[float] | Tensor) -> list[int]:
    """The costs as integers on one common power-of-two scale (exact, order preserving)."""
    if isinstance(cost, Tensor):
        if cost.dim() != 1:
            raise ValueError(f"cost must be 1-D, got shape {list(cost.shape)}")
        cost = cost.tolist()
    values = []
    for i, c in enumerate(cost):
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or not math.isfinite(c):
            raise ValueError(f"cost[{i}] must be a finite number, got {c!r}")
        values.append(float(c).as_integer_ratio())  # denominators are powers of two
    scale = max((d for _, d in values), default=1)
    return [n * (scale // d) for n, d in values]


def plan_reuse_steps(cost: Sequence[float] | Tensor, budget: int, *, warmup: int, tail: int,
                     max_consecutive: int) -> list[int]:
    """The ``budget`` reuse steps of least total cost: an exact dynamic programme.

    Chooses a set ``S`` of exactly ``budget`` steps in the window
    ``warmup <= t <= steps - tail - 1`` (``steps = len(cost)``) minimising

    .. math::  \\sum_{t \\in S} cost[t]

    such that no more than ``max_consecutive`` steps of ``S`` are consecutive. Every
    step outside ``S`` is computed; ``warmup >= 1`` keeps step 0 computed, so each reuse
    step has a computed step before it.

    Formulation (over window positions ``p = 0 .. L-1``, ``L`` the window length):
    state ``(p, k, r)``: ``k`` reuse steps still to place in ``p .. L-1`` and ``r`` the
    length of the run of reuse steps just before ``p``. Value
    ``g(p, k, r) = min(g(p+1, k, 0),  cost[p] + g(p+1, k-1, r+1) if r < M and k > 0)``
    with ``g(L, 0, r) = 0`` and ``g(L, k > 0, r) = ∞``; the answer is ``g(0, budget, 0)``.
    Time ``O(L · budget · M)``. Costs are summed exactly (each float is a dyadic
    rational, scaled to integers), so the optimum and its ties do not depend on
    summation order.

    Tie-break: among optimal sets the lexicographically smallest sorted list is
    returned, i.e. earlier steps are preferred (walking forward, a step is reused
    whenever reusing it is still optimal).

    Parameters
    ----------
    cost
        Per-step cost (finite numbers; e.g. :func:`curvature`, or a reuse error).
    budget
        Number of reuse steps, ``>= 0``.
    warmup
        First steps always computed, ``>= 1``.
    tail
        Last steps always computed, ``>= 0``; ``warmup + tail <= steps``.
    max_consecutive
        Most reuse steps in a row, ``>= 1``.

    Returns
    -------
    list[int]
        The reuse steps, ascending.

    Raises
    ------
    ValueError
        Naming the argument: a bad value, or a ``budget`` above
        :func:`max_reuse_steps`.
    """
    c = _exact_costs(cost)
    steps = len(c)
    if steps < 1:
        raise ValueError("cost must hold at least one step, got 0")
    _check_int("budget", budget, 0)
    _check_int("warmup", warmup, 1)
    _check_int("tail", tail, 0)
    _check_int("max_consecutive", max_consecutive, 1)
    if warmup + tail > steps:
        raise ValueError(f"warmup + tail must be <= steps = {steps}, got warmup={warmup}, tail={tail}")
    most = max_reuse_steps(steps, warmup=warmup, tail=tail, max_consecutive=max_consecutive)
    if budget > most:
        raise ValueError(f"budget={budget} is infeasible: at most {most} reuse steps fit in steps={steps} "
                         f"with warmup={warmup}, tail={tail}, max_consecutive={max_consecutive}")
    if budget == 0:
        return []

    window = [c[t] for t in range(warmup, steps - tail)]
    length, m = len(window), max_consecutive
    # g[p][k][r]; None is +inf. Only k <= budget is needed.
    nxt = [[0 if k == 0 else None for _ in range(m + 1)] for k in range(budget + 1)]
    table = [nxt]
    for p in range(length - 1, -1, -1):
        cur = [[None] * (m + 1) for _ in range(budget + 1)]
        for k in range(budget + 1):
            for r in range(m + 1):
                best = nxt[k][0]
                if r < m and k > 0 and nxt[k - 1][r + 1] is not None:
                    alt = window[p] + nxt[k - 1][r + 1]
                    if best is None or alt < best:
                        best = alt
                cur[k][r] = best
        table.append(cur)
        nxt = cur
    table.reverse()  # table[p] = g(p, ., .)

    chosen, k, r = [], budget, 0
    for p in range(length):
        after = table[p + 1]
        if r < m and k > 0 and after[k - 1][r + 1] is not None \
                and window[p] + after[k - 1][r + 1] == table[p][k][r]:
            chosen.append(warmup + p)
            k, r = k - 1, r + 1
        else:
            r = 0
    assert k == 0, "plan_reuse_steps: reconstruction did not place the budget"
    return chosen


def plan_reuse_steps_in_context(cost, steps: int, budget: int, *, warmup: int, tail: int,
                                max_consecutive: int) -> list[int]:
    """The ``budget`` reuse steps of least total cost when a step's cost depends on where
    the computed steps before it are: an exact dynamic programme over computed steps.

    Reusing step ``t`` costs ``cost(t, j, p, q)``, with ``j`` the last computed step before
    ``t``, ``p`` the computed step before ``j`` and ``q`` the one before ``p`` (``None``
    where there is none): the correction ``R_j + γ1 (R_j - R_p) + γ2 (...)`` at ``t`` is
    built from exactly those steps, so its error depends on them. Minimises
    ``Σ_{t reused} cost(t, j_t, p_t, q_t)`` under the constraints of
    :func:`plan_reuse_steps` (first ``warmup`` and last ``tail`` steps computed, at most
    ``max_consecutive`` reuse steps in a row).

    Formulation: the computed steps ``c_1 = 0 < c_2 < … < c_n`` (``n = steps - budget``)
    with gaps ``c_{k+1} - c_k <= M + 1``. State ``(c, k, g1, g2)``: ``c`` the ``k``-th
    computed step, ``g1 = c - c_prev`` and ``g2`` the gap before that (0 if none).
    A transition to ``c' = c + g`` adds the cost of the reuse steps ``c+1 … c'-1``
    (all sourced from ``j = c, p = c - g1, q = c - g1 - g2``); the final state adds
    the trailing reuse steps (only with ``tail = 0``). ``cost`` is called once per
    ``(t, j, p, q)`` that the constraints allow (``O(steps · M³)`` calls) and the DP
    takes ``O(steps · n · M³)`` time. Ties go to the first optimum found in the fixed
    order of the scan (deterministic).

    Parameters
    ----------
    cost
        ``cost(t, j, p, q) -> float`` (finite).
    steps, budget, warmup, tail, max_consecutive
        As in :func:`plan_reuse_steps` (``steps`` the number of sampling steps).

    Returns
    -------
    list[int]
        The reuse steps, ascending.
    """
    _check_int("steps", steps, 1)
    _check_int("budget", budget, 0)
    _check_int("warmup", warmup, 1)
    _check_int("tail", tail, 0)
    _check_int("max_consecutive", max_consecutive, 1)
    if warmup + tail > steps:
        raise ValueError(f"warmup + tail must be <= steps = {steps}, got warmup={warmup}, tail={tail}")
    most = max_reuse_steps(steps, warmup=warmup, tail=tail, max_consecutive=max_consecutive)
    if budget > most:
        raise ValueError(f"budget={budget} is infeasible: at most {most} reuse steps fit in steps={steps} "
                         f"with warmup={warmup}, tail={tail}, max_consecutive={max_consecutive}")
    m, n, last_free = max_consecutive, steps - budget, steps - tail - 1  # last step that may be reused
    memo: dict = {}

    def run_cost(c, g1, g2, end):
        """Cost of reusing ``c+1 … end-1`` after computed ``c`` (gaps ``g1``, ``g2`` before it)."""
        p = c - g1 if g1 else None
        q = p - g2 if g1 and g2 else None
        total = 0.0
        for t in range(c + 1, end):
            key = (t, c, p, q)
            if key not in memo:
                v = float(cost(t, c, p, q))
                if not math.isfinite(v):
                    raise ValueError(f"cost{key} must be finite, got {v!r}")
                memo[key] = v
            total += memo[key]
        return total

    # best[c][(k, g1, g2)] = (value, previous state key or None)
    best: list[dict] = [dict() for _ in range(steps)]
    best[0][(1, 0, 0)] = (0.0, None)
    answer = None
    for c in range(steps):
        for (k, g1, g2), (value, _) in sorted(best[c].items()):
            trailing = steps - 1 - c
            if k == n and (trailing == 0 or (trailing <= m and c + 1 >= warmup and tail == 0)):
                total = value + run_cost(c, g1, g2, steps)
                if answer is None or total < answer[0]:
                    answer = (total, (c, k, g1, g2))
            if k == n:
                continue
            for g in range(1, m + 2):
                nxt = c + g
                if nxt >= steps or (g > 1 and (c + 1 < warmup or nxt - 1 > last_free)):
                    continue
                total = value + run_cost(c, g1, g2, nxt)
                key = (k + 1, g, g1)
                if key not in best[nxt] or total < best[nxt][key][0]:
                    best[nxt][key] = (total, (c, k, g1, g2))
    if answer is None:
        raise ValueError(f"budget={budget}: no schedule satisfies the constraints")  # guarded above
    computed, state = [], answer[1]
    while state is not None:
        c, k, g1, g2 = state
        computed.append(c)
        state = best[c][(k, g1, g2)][1]
    return [t for t in range(steps) if t not in set(computed)]


def budget_for_compute_fraction(steps: int, fraction: float) -> int:
    """Number of reuse steps for a requested compute fraction.

    The computed steps are ``n_c = max(1, ⌈fraction · steps - 1e-9⌉)`` and the budget is
    ``steps - n_c``: the realised fraction ``n_c / steps`` is the smallest attainable one
    that is ``>= fraction`` (the ``1e-9`` absorbs float error, e.g. ``0.3 · 10``), and
    at least one step is computed. ``fraction = 1`` gives 0.

    Raises ``ValueError`` for ``steps < 1`` or ``fraction`` outside ``(0, 1]``.
    """
    _check_int("steps", steps, 1)
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
    computed = max(1, math.ceil(fraction * steps - 1e-9))
    return steps - computed


def compute_schedule(steps: int, reuse_steps: Sequence[int]) -> list[bool]:
    """The compute schedule (``True`` = computed) with the given steps reused."""
    _check_int("steps", steps, 1)
    out = [True] * steps
    for t in reuse_steps:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < steps:
            raise ValueError(f"reuse_steps holds {t!r}, not a step in [0, {steps})")
        out[t] = False
    return out
