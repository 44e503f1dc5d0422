"""Static plans: no host synchronisation in the step loop; one step compiles with
``torch.compile(fullgraph=True)`` and equals eager."""

import pytest
import torch

from omnicache.plan import CachePlan
from omnicache.policies import DeltaDiTConfig, FORAConfig, TaylorSeerConfig, TeaCacheConfig
from omnicache.runtime.executor import CacheExecutor
from omnicache.runtime.syncguard import HostSyncError, no_host_sync

from compile_helpers import compile_step_equals_eager

LABELS = torch.tensor([2, 7, 1])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tiny_dit):
    return tiny_dit


def test_guard_catches_syncs():
    x = torch.ones(4)
    for sync in (lambda: x.sum().item(), lambda: bool(x[0]), lambda: x.tolist(), lambda: float(x[0]),
                 lambda: int(x[0]), lambda: x.cpu(), lambda: x.numpy(), lambda: [0, 1][x[0].long()]):
        with pytest.raises(RuntimeError, match="host sync"), no_host_sync():
            sync()
    with no_host_sync():
        y = (x * 2).sum()  # device work is fine
    assert y.item() == 8.0  # and the guard is gone afterwards


def test_guard_catches_a_dynamic_policy(model):
    ex = CacheExecutor(model, LABELS, TeaCacheConfig(threshold=0.1), steps=4, guidance=2.0)
    with pytest.raises(HostSyncError, match=r"Tensor\.tolist"), no_host_sync():
        ex.run(0)


def saved_and_loaded(tmp_path):
    path = tmp_path / "plan.json"
    TaylorSeerConfig(interval=3, order=2, warmup=1, granularity="block").plan(10, 2).save(path)
    return CachePlan.load(path)


@pytest.mark.parametrize("policy", [
    lambda tmp: FORAConfig(interval=3),
    lambda tmp: FORAConfig(interval=2, granularity="step"),
    lambda tmp: TaylorSeerConfig(interval=3, order=2, warmup=1),
    lambda tmp: DeltaDiTConfig(interval=2, group_size=1),
    saved_and_loaded,
], ids=["fora-branch", "fora-step", "taylorseer", "delta-dit", "loaded-plan"])
def test_static_loop_has_no_host_sync(model, tmp_path, policy):
    ex = CacheExecutor(model, LABELS, policy(tmp_path), steps=10, guidance=2.0)
    with no_host_sync():
        x, summary = ex.run(0)
    ref, _ = CacheExecutor(model, LABELS, policy(tmp_path), steps=10, guidance=2.0).run(0)
    assert torch.equal(x, ref)
    assert summary.stats is not None  # statistics are read back after the loop, lazily


@pytest.mark.parametrize("granularity", ["step", "block", "branch"])
def test_compiled_step_no_graph_break(model, granularity):
    plan = TaylorSeerConfig(interval=2, order=2, warmup=1, granularity=granularity).plan(8, 2)
    ex = CacheExecutor(model, LABELS, plan, steps=8, guidance=2.0)
    compile_step_equals_eager(ex, 3, "aot_eager")  # a full step storing F, D1, D2
    compile_step_equals_eager(ex, 4, "aot_eager")  # a forecast step


def test_compiled_step_inductor(model):
    ex = CacheExecutor(model, LABELS, FORAConfig(interval=2, granularity="block"), steps=4, guidance=2.0)
    compile_step_equals_eager(ex, 1, "inductor")


def test_inductor_order2_store(model):
    """A full step that stores F, D1 and D2 (TaylorSeer order 2) compiled by inductor
    writes the same caches as eager: D2 must be the new D1 minus the old one."""
    plan = TaylorSeerConfig(interval=2, order=2, warmup=1, granularity="step").plan(8, 2)
    ex = CacheExecutor(model, LABELS, plan, steps=8, guidance=2.0)
    # inductor reorders the model's float ops (~1e-6 here); the mis-ordered store was off by ~5.
    compile_step_equals_eager(ex, 3, "inductor", atol=1e-4)


# ------------------------------------------------------------------ count_host_syncs
def test_count_host_syncs_counts_the_read_backs():
    from omnicache.runtime.syncguard import count_host_syncs

    x = torch.ones(4)
    methods = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "nonzero")}
    with count_host_syncs() as syncs:
        x.sum().item()
        x.tolist()
        bool(x[0]), float(x[0]), int(x[0])
        x.nonzero()  # not a read-back by default
        y = (x * 2).sum()  # device work is not counted
    assert syncs.count == 5 and dict(syncs.by_method) == {"item": 1, "tolist": 1, "__bool__": 1, "__float__": 1,
                                                          "__int__": 1}
    with count_host_syncs(("item", "nonzero")) as only:
        x.sum().item(), x.nonzero(), x.tolist()
    assert only.count == 2 and dict(only.by_method) == {"item": 1, "nonzero": 1}
    # everything restored: the methods are torch's own, no mode is left, later calls are not counted
    assert all(getattr(torch.Tensor, n) is m for n, m in methods.items())
    assert not torch._C._is_torch_function_mode_enabled()
    assert y.item() == 8.0 and syncs.count == 5 and only.count == 2


def test_count_host_syncs_restores_after_an_error_and_checks_names():
    from omnicache.runtime.syncguard import count_host_syncs

    with pytest.raises(ZeroDivisionError), count_host_syncs():
        torch.ones(1).item() / 0
    assert not torch._C._is_torch_function_mode_enabled()
    with pytest.raises(ValueError, match="not syncing tensor methods"), count_host_syncs(("item", "sum")):
        pass
    with count_host_syncs() as outer, pytest.raises(HostSyncError), no_host_sync():  # the guard still raises
        torch.ones(1).item()
    assert outer.count == 0  # the guard, innermost, saw the call first
