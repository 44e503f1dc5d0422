"""PSNR, SSIM (against scikit-image, a test-only dependency) and class accuracy."""

import math

import pytest
import torch
import torch.nn as nn

from omnicache.metrics import class_accuracy, psnr, ssim, to_unit

skimage_metrics = pytest.importorskip("skimage.metrics", reason="scikit-image is the SSIM/PSNR reference")


def random_pair(shape, seed, noise=0.1):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g, dtype=torch.float64)
    b = (a + noise * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return a, b


def structured_pair(shape, seed):
    """Smooth gradients and a checkerboard edge, the second image shifted, blurred and noisy."""
    B, C, H, W = shape
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.linspace(0, 1, H, dtype=torch.float64), torch.linspace(0, 1, W, dtype=torch.float64)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    base = torch.stack([0.5 + 0.5 * torch.sin(6 * xx + 3 * c) * torch.cos(4 * yy) for c in range(C)])
    base = torch.where((xx > 0.5) ^ (yy > 0.4), base, 1 - base)
    a = base.expand(B, C, H, W).clone()
    a = a * torch.rand(B, 1, 1, 1, generator=g, dtype=torch.float64)
    b = torch.roll(a, shifts=1, dims=3)
    b = 0.5 * b + 0.25 * (torch.roll(b, 1, 2) + torch.roll(b, -1, 2))
    b = (b + 0.02 * torch.randn(b.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return a, b


def sk_ssim(a, b, win_size=7):
    return torch.tensor(
        [
            skimage_metrics.structural_similarity(
                x.numpy(), y.numpy(), data_range=1.0, channel_axis=0, win_size=win_size
            )
            for x, y in zip(a, b)
        ],
        dtype=torch.float64,
    )


SHAPES = [(4, 1, 8, 8), (2, 3, 16, 16), (3, 1, 7, 9), (2, 4, 32, 24), (1, 2, 11, 7)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("make", [random_pair, structured_pair])
def test_ssim_matches_skimage(shape, make):
    a, b = make(shape, seed=sum(shape))
    ours = ssim(a, b, data_range=1.0, reduction="none")
    assert ours.shape == (shape[0],) and ours.dtype == torch.float64
    torch.testing.assert_close(ours, sk_ssim(a, b), rtol=0, atol=1e-3)
    torch.testing.assert_close(ssim(a, b), sk_ssim(a, b).mean(), rtol=0, atol=1e-3)


def test_ssim_float32_inputs_and_identity():
    a, b = random_pair((3, 1, 8, 8), seed=1)
    ref = sk_ssim(a.float().double(), b.float().double())
    torch.testing.assert_close(ssim(a.float(), b.float(), reduction="none"), ref, rtol=0, atol=1e-3)
    torch.testing.assert_close(ssim(a, a, reduction="none"), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("shape,win", [((2, 1, 5, 5), 5), ((2, 2, 4, 6), 3), ((1, 1, 6, 9), 5)])
def test_ssim_small_images_use_largest_odd_window(shape, win):
    a, b = random_pair(shape, seed=3)
    torch.testing.assert_close(ssim(a, b, reduction="none"), sk_ssim(a, b, win_size=win), rtol=0, atol=1e-3)


def test_ssim_data_range():
    a, b = random_pair((2, 1, 8, 8), seed=4)
    torch.testing.assert_close(ssim(255 * a, 255 * b, data_range=255.0), ssim(a, b))


@pytest.mark.parametrize("shape", SHAPES)
def test_psnr(shape):
    a, b = random_pair(shape, seed=5)
    ours = psnr(a, b, reduction="none")
    mse = ((a - b) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(ours, 10 * torch.log10(1.0 / mse))
    ref = [skimage_metrics.peak_signal_noise_ratio(x.numpy(), y.numpy(), data_range=1.0) for x, y in zip(a, b)]
    ref = torch.tensor(ref, dtype=torch.float64)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(psnr(a, b), ours.mean())
    torch.testing.assert_close(psnr(2 * a, 2 * b, data_range=2.0, reduction="none"), ours)


def test_psnr_known_value_and_identity():
    a = torch.zeros(1, 1, 4, 4)
    b = torch.full((1, 1, 4, 4), 0.1)
    assert math.isclose(psnr(a, b).item(), 20.0, rel_tol=1e-6)  # mse 0.01 -> 20 dB
    assert psnr(a, a, reduction="none").item() == math.inf


def test_bad_arguments():
    a = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, a[:1])
    with pytest.raises(ValueError, match="same shape"):
        ssim(a, a[..., :7])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        ssim(a[0], a[0])
    with pytest.raises(ValueError, match="reduction"):
        psnr(a, a, reduction="sum")
    with pytest.raises(ValueError, match="win_size"):
        ssim(a, a, win_size=4)


def test_to_unit():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])
    assert to_unit(x).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


class _Oracle(nn.Module):
    """Predicts the class stored in pixel (0, 0)."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return nn.functional.one_hot(x[:, 0, 0, 0].long(), 10).float() + self.dummy


def test_class_accuracy():
    labels = torch.arange(8) % 10
    images = torch.zeros(8, 1, 8, 8)
    images[:, 0, 0, 0] = labels.float()
    assert class_accuracy(_Oracle(), images, labels) == 1.0
    images[:2, 0, 0, 0] = 9.0 - labels[:2].float()  # two wrong
    assert class_accuracy(_Oracle(), images, labels) == 0.75
    with pytest.raises(ValueError, match="batch size"):
        class_accuracy(_Oracle(), images, labels[:3])
