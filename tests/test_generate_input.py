"""generate(): bad arguments are named, the caller's model is never changed, and a run
whose samples turn non-finite says so (issue 15.2, 15.3, 15.9)."""

import pytest
import torch

from omnicache.api import generate
from omnicache.plan import CachePlan
from omnicache.policies import TaylorSeerConfig
from omnicache.runtime import load_default, make_dit


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return make_dit("tiny").eval()


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_meta_device_is_refused_and_the_model_kept(tiny):
    before = state(tiny)
    ref = generate(tiny, [1, 2], steps=2, guidance=2.0).samples
    with pytest.raises(ValueError, match="device='meta'"):
        generate(tiny, [1, 2], steps=2, device="meta")
    assert all(p.device.type == "cpu" for p in tiny.parameters())
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    assert torch.equal(generate(tiny, [1, 2], steps=2, guidance=2.0).samples, ref)  # still usable


@pytest.mark.parametrize("device, needle", [("bogus", "device must be a torch device"),
                                            ("cuda:7" if torch.cuda.is_available() else "cuda", "not available")])
def test_unusable_device_named(tiny, device, needle):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(ValueError, match=needle):
        generate(tiny, [1], steps=2, device=device)
    assert all(p.device.type == "cpu" for p in tiny.parameters())


def test_same_device_runs_the_model_itself(tiny):
    a = generate(tiny, [1, 2], steps=2, device="cpu").samples
    assert torch.equal(a, generate(tiny, [1, 2], steps=2).samples)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (a GPU)")
def test_other_device_runs_on_a_copy(tiny):
    before = state(tiny)
    out = generate(tiny, [1, 2], steps=2, device="cuda")
    assert out.samples.device.type == "cuda"
    assert all(p.device.type == "cpu" for p in tiny.parameters())
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())


def test_model_on_meta_named():
    with torch.device("meta"):
        model = make_dit("tiny")
    with pytest.raises(ValueError, match="model: .*'meta'"):
        generate(model, [1], steps=2)


@pytest.mark.parametrize("labels, needle", [
    ([0.9, 1.7], r"labels\[0\] must be an int class id, got 0\.9"),
    ([1, 2.0], r"labels\[1\] must be an int class id"),
    (torch.tensor([0.9, 1.7]), "labels must be class ids .* torch.float32"),
    ("ab", "labels must be a list of int class ids"),
    ([True, False], r"labels\[0\] must be an int"),
    (torch.tensor([True]), "labels must be class ids"),
    ([], "non-empty"),
    ([3, 10], r"labels must be in \[0, 10\)"),
    ([2**70], r"labels must be in \[0, 10\)"),
    (5, "labels must be a list"),
])
def test_bad_labels_named(tiny, labels, needle):
    with pytest.raises(ValueError, match=needle):
        generate(tiny, labels, steps=2)


def test_integer_labels_of_any_kind(tiny):
    ref = generate(tiny, [1, 2], steps=2).samples
    for labels in (torch.tensor([1, 2], dtype=torch.int32), list(torch.tensor([1, 2])), (1, 2)):
        assert torch.equal(generate(tiny, labels, steps=2).samples, ref)


@pytest.mark.parametrize("seed", [2**70, -2**64, 1.5, True, "3"])
def test_bad_seed_named(tiny, seed):
    with pytest.raises(ValueError, match="seed must be an int"):
        generate(tiny, [1], steps=2, seed=seed)


def test_large_seeds_that_torch_takes(tiny):
    generate(tiny, [1], steps=2, seed=2**64 - 1)
    generate(tiny, [1], steps=2, seed=-2**63)


def test_non_finite_samples_are_reported():
    """A gamma float32 holds (3e38) but that overflows the correction: not silent NaNs."""
    model = load_default()
    steps, depth = 6, len(model.blocks)
    plan = TaylorSeerConfig(interval=2, order=1, warmup=1).plan(steps, depth)
    reuse = next(i for i, row in enumerate(plan.compute) if not row[0][0] and i >= 3)
    gamma = list(plan.gamma)
    gamma[reuse] = 3e38
    bad = CachePlan(steps, depth, plan.granularity, plan.compute, gamma, plan.gamma2, plan.meta)
    generate(model, [1, 2], policy=plan, steps=steps)  # the plan itself runs fine
    with pytest.raises(RuntimeError, match="samples are not finite"):
        generate(model, [1, 2], policy=bad, steps=steps)
