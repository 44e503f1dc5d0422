"""OmniCache's cache-noise correction: least-squares γ of ``R_t ≈ R_j + γ1 D1 + γ2 D2``.

:func:`fit_gamma` / :func:`fit_gammas` fit the first-order correction
``hidden += R_j + γ_t (R_j - R_prev)`` at each reuse step (through
``omnicache.ops.trajectory_stats``), :func:`fit_gamma2` / :func:`fit_gammas2` the
second-order one, and :func:`reuse_error` says how far the corrected reuse is from the
true residual. Indexing as in :mod:`.schedule`. Calibration time: host syncs are fine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ... import ops

__all__ = ["fit_gamma", "fit_gammas", "fit_gamma2", "fit_gammas2", "reuse_error"]

EPS = 1e-12


def fit_gamma(r_true: Tensor, r_j: Tensor, r_prev: Tensor, *, per_sample: bool = False,
              eps: float = EPS) -> Tensor:
    """Least-squares γ of the cache-noise correction ``R_true - R_j ≈ γ (R_j - R_prev)``.

    With ``[‖v_1‖², ‖v_0‖², ⟨v_1, v_0⟩] = ops.trajectory_stats(R_true, R_j, R_prev)``
    (``v_1 = R_true - R_j``, ``v_0 = R_j - R_prev``):

    .. math::  γ = \\frac{\\sum_b ⟨v_1, v_0⟩_b}{\\sum_b ‖v_0‖_b^2}

    pooled over the batch (one γ for every sample), or per sample with
    ``per_sample=True``. Where the denominator is ``<= eps`` (no drift) γ is 0.

    Parameters
    ----------
    r_true, r_j, r_prev
        ``[B, ...]`` float32/float16/bfloat16, same shape and device.

    Returns
    -------
    Tensor
        float32, shape ``[]`` (pooled) or ``[B]``, on the inputs' device: the ``gamma``
        argument of ``ops.apply_residual_``.
    """
    stats = ops.trajectory_stats(r_true, r_j, r_prev).double()
    dot, n0 = stats[:, 2], stats[:, 1]
    if not per_sample:
        dot, n0 = dot.sum(), n0.sum()
    return torch.where(n0 > eps, dot / n0.clamp_min(eps), torch.zeros_like(n0)).float()


def _residual_list(residuals: Sequence[Tensor] | Tensor) -> list[Tensor]:
    if isinstance(residuals, Tensor):
        if residuals.dim() < 2:
            raise ValueError(f"residuals as one tensor must be [steps, B, ...], got shape {list(residuals.shape)}")
        residuals = residuals.unbind(0)
    out = list(residuals)
    if not out:
        raise ValueError("residuals must hold at least one step")
    return out


def _compute_list(compute: Sequence[bool] | Tensor, steps: int) -> list[bool]:
    if isinstance(compute, Tensor):
        compute = compute.tolist()
    compute = list(compute)
    if len(compute) != steps:
        raise ValueError(f"compute must have one entry per step ({steps}), got {len(compute)}")
    for i, v in enumerate(compute):
        if not isinstance(v, bool):
            raise ValueError(f"compute[{i}] must be a bool, got {v!r}")
    if not compute[0]:
        raise ValueError("compute[0] must be True: a reuse step needs a computed step before it")
    return compute


def _sources(compute: list[bool]) -> list[tuple[int, int | None] | None]:
    """Per step: None if computed, else ``(j, p)``: the last computed step ``j < t`` and
    the computed step ``p < j`` before it (None if there is none)."""
    out, last, before = [], None, None
    for c in compute:
        if c:
            out.append(None)
            last, before = len(out) - 1, last
        else:
            out.append((last, before))
    return out


def fit_gammas(residuals: Sequence[Tensor] | Tensor, compute: Sequence[bool] | Tensor, *,
               per_sample: bool = False, eps: float = EPS) -> Tensor:
    """Per-step γ of the correction, fitted on an uncached calibration run.

    For each reuse step ``t`` with ``j`` the last computed step before ``t`` and ``p``
    the computed step before ``j``, the executor applies
    ``hidden += R_j + γ_t (R_j - R_p)``, so

    .. math::  γ_t = \\arg\\min_γ ‖R_t - R_j - γ (R_j - R_p)‖^2 = \\text{fit\\_gamma}(R_t, R_j, R_p).

    ``γ_t = 0`` at computed steps and where there is no ``p`` (only one computed step
    before ``t``). For residuals that drift linearly in the step index,
    ``γ_t = (t - j) / (j - p)``.

    Parameters
    ----------
    residuals
        ``R_0 … R_{N-1}``: ``N`` tensors ``[B, ...]``, or one ``[N, B, ...]``.
    compute
        ``N`` bools (``True`` = computed); ``compute[0]`` must be True.
    per_sample, eps
        As in :func:`fit_gamma`.

    Returns
    -------
    Tensor
        float32 ``[N]`` (or ``[N, B]``) on the residuals' device.
    """
    res = _residual_list(residuals)
    comp = _compute_list(compute, len(res))
    batch = res[0].shape[0]
    zero = torch.zeros((batch,) if per_sample else (), dtype=torch.float32, device=res[0].device)
    out = []
    for t, src in enumerate(_sources(comp)):
        if src is None or src[1] is None:
            out.append(zero)
        else:
            j, p = src
            out.append(fit_gamma(res[t], res[j], res[p], per_sample=per_sample, eps=eps))
    return torch.stack(out)


def fit_gamma2(r_true: Tensor, r_j: Tensor, r_p: Tensor, r_q: Tensor | None = None, *,
               eps: float = EPS) -> Tensor:
    """Joint least-squares ``(γ1, γ2)`` of the second-order correction.

    The executor forecasts a reused residual from the last three computed ones
    (``R_j``, ``R_p``, ``R_q``, newest first) as ``R_j + γ1 D1 + γ2 D2`` with
    ``D1 = R_j - R_p`` and ``D2 = (R_j - R_p) - (R_p - R_q)``, so

    .. math::  (γ_1, γ_2) = \\arg\\min ‖R_{true} - R_j - γ_1 D_1 - γ_2 D_2‖^2

    pooled over the batch: the 2 × 2 normal equations ``G γ = b``
    (``G = [[⟨D1,D1⟩, ⟨D1,D2⟩], [⟨D1,D2⟩, ⟨D2,D2⟩]]``, ``b = [⟨v,D1⟩, ⟨v,D2⟩]``,
    ``v = R_true - R_j``) solved in float64. Without ``r_q`` (only two computed steps
    so far), or where ``D2`` is (numerically) a multiple of ``D1``, ``γ2 = 0`` and ``γ1``
    is :func:`fit_gamma`; where ``D1 = 0`` both are 0.

    Returns
    -------
    Tensor
        float32 ``[2]``: ``(γ1, γ2)``.
    """
    g1 = fit_gamma(r_true, r_j, r_p, eps=eps).double()
    zero = torch.zeros((), dtype=torch.float64, device=g1.device)
    if r_q is None:
        return torch.stack([g1, zero]).float()
    v = (r_true.double() - r_j.double()).flatten()
    d1 = (r_j.double() - r_p.double()).flatten()
    d2 = d1 - (r_p.double() - r_q.double()).flatten()
    a11, a12, a22 = d1.dot(d1), d1.dot(d2), d2.dot(d2)
    det = a11 * a22 - a12 * a12
    if det <= 1e-10 * a11 * a22 or a11 <= eps:  # D2 ∥ D1 (or no drift): first order only
        return torch.stack([g1, zero]).float()
    b1, b2 = v.dot(d1), v.dot(d2)
    return torch.stack([(a22 * b1 - a12 * b2) / det, (a11 * b2 - a12 * b1) / det]).float()


def fit_gammas2(residuals: Sequence[Tensor] | Tensor, compute: Sequence[bool] | Tensor, *,
                eps: float = EPS) -> Tensor:
    """Per-step ``(γ1, γ2)`` of the second-order correction for a compute schedule.

    For each reuse step ``t``: ``j`` the last computed step before it, ``p`` and ``q`` the
    two computed steps before ``j``; :func:`fit_gamma2` of ``(R_t, R_j, R_p, R_q)``.
    Rows are ``(0, 0)`` at computed steps and where there is no ``p``; ``γ2 = 0`` where
    there is no ``q``. These are the executor's ``gamma``/``gamma2`` (its ``D1``, ``D2``
    are built from the same computed steps).

    Returns
    -------
    Tensor
        float32 ``[N, 2]`` on the residuals' device.
    """
    res = _residual_list(residuals)
    comp = _compute_list(compute, len(res))
    out, history = [], []
    zero = torch.zeros(2, dtype=torch.float32, device=res[0].device)
    for t, c in enumerate(comp):
        if c:
            history.append(t)
            out.append(zero)
        elif len(history) < 2:
            out.append(zero)
        else:
            j, p = history[-1], history[-2]
            q = history[-3] if len(history) > 2 else None
            out.append(fit_gamma2(res[t], res[j], res[p], None if q is None else res[q], eps=eps))
    return torch.stack(out)


def reuse_error(residuals: Sequence[Tensor] | Tensor, compute: Sequence[bool] | Tensor,
                gammas: Tensor | Sequence[float] | None = None, *, per_sample: bool = False,
                eps: float = EPS) -> Tensor:
    """Relative L2 error of the reuse estimate at each step.

    At a reuse step ``t`` (``j``, ``p`` as in :func:`fit_gammas`) the estimate is
    ``R̂_t = R_j + γ_t (R_j - R_p)`` (just ``R_j`` without ``gammas`` or without ``p``)
    and the error is

    .. math::  e_t = \\frac{‖R_t - R̂_t‖}{\\max(‖R_t‖, eps)}

    with norms over the whole batch (or per sample), computed in float64; ``e_t = 0``
    at computed steps.

    Parameters
    ----------
    residuals, compute
        As in :func:`fit_gammas`.
    gammas
        ``[N]`` or ``[N, B]`` (per sample) per-step γ, e.g. from :func:`fit_gammas`.

    Returns
    -------
    Tensor
        float32 ``[N]`` (or ``[N, B]``) on the residuals' device.
    """
    res = _residual_list(residuals)
    comp = _compute_list(compute, len(res))
    batch, device = res[0].shape[0], res[0].device
    if gammas is not None:
        gammas = torch.as_tensor(gammas, dtype=torch.float64, device=device)
        if gammas.dim() == 0 or gammas.shape[0] != len(res):
            raise ValueError(f"gammas must have one entry per step ({len(res)}), got shape {list(gammas.shape)}")
    out = []
    for t, src in enumerate(_sources(comp)):
        if src is None:
            out.append(torch.zeros(batch if per_sample else (), dtype=torch.float64, device=device))
            continue
        j, p = src
        r_t = res[t].double().reshape(batch, -1)
        est = res[j].double().reshape(batch, -1)
        if gammas is not None and p is not None:
            g = gammas[t].reshape(-1, 1) if gammas.dim() > 1 else gammas[t]
            est = est + g * (est - res[p].double().reshape(batch, -1))
        num, den = (r_t - est).square().sum(1), r_t.square().sum(1)
        if not per_sample:
            num, den = num.sum(), den.sum()
        out.append(num.sqrt() / den.sqrt().clamp_min(eps))
    return torch.stack(out).float()
