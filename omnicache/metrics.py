"""Quality metrics: PSNR and SSIM against an uncached reference, class accuracy of samples.

Images are (B, C, H, W) tensors in ``[0, data_range]`` (use ``to_unit`` for model outputs
in [-1, 1]). PSNR and SSIM are computed per sample in float64; ``reduction="mean"``
averages over the batch. Pure torch: scikit-image is only the tests' reference.
"""

import torch
import torch.nn.functional as F

__all__ = ["to_unit", "psnr", "ssim", "class_accuracy"]


def to_unit(x):
    """Maps model-space images in [-1, 1] to [0, 1] (clamped)."""
    return ((x.float() + 1.0) * 0.5).clamp(0.0, 1.0)


def _check_pair(a, b):
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() != 4:
        raise ValueError(f"a must be (B, C, H, W), got shape {tuple(a.shape)}")


def _reduce(values, reduction):
    if reduction == "none":
        return values
    if reduction == "mean":
        return values.mean()
    raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}")


def psnr(a, b, data_range=1.0, reduction="mean"):
    """Peak signal-to-noise ratio ``10 * log10(data_range^2 / mean((a - b)^2))`` per sample.

    Returns a float64 tensor: (B,) for ``reduction="none"``, a scalar for ``"mean"``.
    Identical samples give ``inf``.
    """
    _check_pair(a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)  # (B,)
    return _reduce(10.0 * torch.log10(data_range**2 / mse), reduction)


def ssim(a, b, data_range=1.0, win_size=7, reduction="mean"):
    """Structural similarity per sample, as ``skimage.metrics.structural_similarity``
    with its defaults (``gaussian_weights=False``, ``K1=0.01``, ``K2=0.03``,
    ``use_sample_covariance=True``) and ``channel_axis=0`` for each (C, H, W) image.

    With window means ``ux, uy`` and sample (co)variances (normalised by ``N - 1``,
    ``N = win_size^2``) ``vx, vy, vxy`` over each ``win_size``-square window::

        S = (2 ux uy + C1)(2 vxy + C2) / ((ux^2 + uy^2 + C1)(vx + vy + C2)),
        C1 = (0.01 * data_range)^2,  C2 = (0.03 * data_range)^2

    and SSIM is the mean of ``S`` over the windows fully inside the image (skimage crops
    ``(win_size - 1) // 2`` border pixels, which is exactly those windows), then over
    channels. Images smaller than ``win_size`` use the largest odd window that fits
    (skimage raises there instead). Returns float64: (B,) or the batch mean.
    """
    _check_pair(a, b)
    if win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"win_size must be a positive odd int, got {win_size!r}")
    B, C, H, W = a.shape
    side = min(H, W)
    if side < win_size:
        win_size = side if side % 2 else side - 1
    if win_size < 1:
        raise ValueError(f"a must be at least 1x1 pixels, got {H}x{W}")
    x = a.double().reshape(B * C, 1, H, W)
    y = b.double().reshape(B * C, 1, H, W)
    n = win_size * win_size
    cov_norm = n / (n - 1) if n > 1 else 1.0

    def mean(z):  # window mean over valid positions: (B*C, 1, H-w+1, W-w+1)
        return F.avg_pool2d(z, win_size, stride=1)

    ux, uy = mean(x), mean(y)
    vx = cov_norm * (mean(x * x) - ux * ux)
    vy = cov_norm * (mean(y * y) - uy * uy)
    vxy = cov_norm * (mean(x * y) - ux * uy)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    per_sample = s.reshape(B, C, -1).mean(2).mean(1)  # (B,)
    return _reduce(per_sample, reduction)


@torch.no_grad()
def class_accuracy(classifier, images, labels):
    """Share of ``images`` (B, C, H, W, in the classifier's input range) that ``classifier``
    assigns to ``labels`` (B,). Returns a Python float (synchronises with the host)."""
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"images and labels must have the same batch size, got {images.shape[0]} and {labels.shape[0]}"
        )
    if labels.numel() == 0:
        raise ValueError("labels must not be empty")
    param = next(classifier.parameters())
    logits = classifier(images.to(device=param.device, dtype=param.dtype))
    return (logits.argmax(dim=1) == labels.to(logits.device)).float().mean().item()
