"""Fixtures shared by the runtime tests: one torch thread, a small randomised DiT."""

import pytest
import torch

from omnicache.runtime import make_dit


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes: intra-op threads only add overhead (and spin badly on a busy 2-core box).
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dit():
    """The ``tiny`` preset with its weights randomised (adaLN-Zero starts as the identity,
    so untrained blocks would do nothing), in eval mode; the same weights every time."""
    torch.manual_seed(0)
    m = make_dit("tiny")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()
