"""Dynamic policies with ``mode="device"`` on our runtime: the host mode's decisions and
outputs, no host read over the sampling loop but ``torch.cond``'s own predicate (none in
``mode="device-where"`` or a CUDA graph), one ``fullgraph`` compile for the whole run."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from omnicache.cache import DeviceDecisions
from omnicache.policies import FirstBlockCacheConfig, TeaCacheConfig
from omnicache.runtime.executor import CacheExecutor
from omnicache.runtime.syncguard import count_host_syncs, no_host_sync

from compile_helpers import only_cond_reads

LABELS = torch.tensor([2, 7, 1])
STEPS = 8

pytestmark = pytest.mark.usefixtures("one_thread")

POLICIES = {
    "teacache": lambda t: TeaCacheConfig(threshold=t),
    "teacache-poly": lambda t: TeaCacheConfig(threshold=t, coefficients=(3.0, -0.5, 1.2, 0.0)),
    "fbcache1": lambda t: FirstBlockCacheConfig(threshold=t, first_blocks=1),
    "fbcache-warmup2": lambda t: FirstBlockCacheConfig(threshold=t, warmup=2),
    "fbcache-reuse": lambda t: FirstBlockCacheConfig(threshold=1e9),  # every step after the first reuses
    "fbcache-cap": lambda t: FirstBlockCacheConfig(threshold=t, max_consecutive=1),  # DBCache's cap
}


@pytest.fixture(scope="module")
def model(tiny_dit):
    return tiny_dit


def threshold_for(model, config_of):
    """A threshold at which some samples compute and others reuse (from a host-mode probe run)."""
    probe = config_of(0.0)
    summary = CacheExecutor(model, LABELS, probe, steps=STEPS, guidance=3.0).run(0)[1]
    if isinstance(probe, FirstBlockCacheConfig):  # halfway between two samples at the first reuse step
        rel = sorted(summary.stats[probe.warmup]["signal_rel_l1"])
        return (rel[1] + rel[2]) / 2
    p = probe.coefficients  # TeaCache accumulates p(rel)
    rel = sorted(float(np.polyval(p, r)) for d in summary.stats[1:] for r in d["signal_rel_l1"])
    return rel[len(rel) // 2] + 1e-7


def device(config, mode="device"):
    return dataclasses.replace(config, mode=mode)


def test_mode_is_validated():
    for cls in (TeaCacheConfig, FirstBlockCacheConfig):
        assert cls().mode == "host"
        with pytest.raises(ValueError, match=rf"{cls.__name__}\.mode must be one of 'host', 'device', "
                                             rf"'device-where', got 'gpu'"):
            cls(mode="gpu")


@pytest.mark.parametrize("name", list(POLICIES))
def test_device_mode_equals_host_mode(model, name):
    config = POLICIES[name](threshold_for(model, POLICIES[name]))
    x_host, s_host = CacheExecutor(model, LABELS, config, steps=STEPS, guidance=3.0).run(0)
    ex = CacheExecutor(model, LABELS, device(config), steps=STEPS, guidance=3.0)
    with only_cond_reads() as conds:  # the whole sampling loop (a CUDA graph: test at the end)
        x_dev, s_dev = ex.run(0, summary=False)
    assert len(conds) == STEPS  # one torch.cond per step
    s_dev = ex.summary()
    dec_host = [d["compute"] for d in s_host.stats]
    assert [d["compute"] for d in s_dev.stats] == dec_host
    if name == "fbcache-reuse":  # torch.cond's reuse branch
        assert not any(map(any, dec_host[1:]))
    else:  # torch.cond's compute branch, samples mixed with torch.where
        assert any(0 < sum(d) < len(LABELS) for d in dec_host), "no step mixed computing and reusing samples"
    for a, b in zip(s_dev.stats[1:], s_host.stats[1:]):
        torch.testing.assert_close(a["signal_rel_l1"], b["signal_rel_l1"], rtol=1e-5, atol=1e-7)
        if "accumulated" in b:
            torch.testing.assert_close(a["accumulated"], b["accumulated"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x_dev, x_host, rtol=1e-5, atol=1e-5)
    assert torch.equal(s_dev.decisions, s_host.decisions)
    # the where-mix spends the whole batch wherever one sample computes; the sub-batch mode's count
    assert s_dev.flops_sub_batch == pytest.approx(s_host.flops, rel=1e-12)
    assert s_dev.flops >= s_dev.flops_sub_batch
    # F and the reference (+ TeaCache's accumulators, B float64s; the cap's counters, B int64s)
    assert s_dev.cache_bytes == s_host.cache_bytes + 8 * len(LABELS) * name.startswith(("teacache", "fbcache-cap"))


def test_a_second_run_starts_from_empty_state(model):
    config = device(POLICIES["teacache"](threshold_for(model, POLICIES["teacache"])))
    ex = CacheExecutor(model, LABELS, config, steps=STEPS, guidance=3.0)
    a, sa = ex.run(0)
    b, sb = ex.run(0)
    assert torch.equal(a, b) and [d["compute"] for d in sa.stats] == [d["compute"] for d in sb.stats]


@pytest.mark.parametrize("name", ["teacache", "fbcache-warmup2"])
def test_compiled_run_fullgraph_no_recompile(model, name):
    """``torch.compile(ex.device_forward, fullgraph=True)``: one graph for every step of two runs
    (the step is a device counter), ``torch.cond`` inside, equal to eager."""
    torch._dynamo.reset()
    config = device(POLICIES[name](threshold_for(model, POLICIES[name])))
    ex = CacheExecutor(model, LABELS, config, steps=STEPS, guidance=3.0)
    x_eager, s_eager = ex.run(0)
    counts = []

    def backend(gm, inputs):
        counts.append(sum(n.target is torch.ops.higher_order.cond for n in gm.graph.nodes))
        return gm  # the traced graph itself (fast on a busy CPU); inductor: test below

    ex.device_forward = torch.compile(ex.device_forward, fullgraph=True, backend=backend)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for run in range(2):
            with count_host_syncs() as syncs:
                x, _ = ex.run(0, summary=False)
            if run:  # once compiled (the first run's tracing reads a value): the traced graph runs
                assert dict(syncs.by_method) == {"__bool__": STEPS}, syncs  # its torch.cond eagerly
            s = ex.summary()
            torch.testing.assert_close(x, x_eager, rtol=1e-5, atol=1e-5)
            assert [d["compute"] for d in s.stats] == [d["compute"] for d in s_eager.stats]
    assert counts == [1]  # one graph, with its torch.cond
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["teacache", "fbcache1"])
def test_device_where_equals_host_mode(model, name):
    """``mode="device-where"``: the same decisions and outputs; the rest computed every step."""
    config = POLICIES[name](threshold_for(model, POLICIES[name]))
    x_host, s_host = CacheExecutor(model, LABELS, config, steps=STEPS, guidance=3.0).run(0)
    ex = CacheExecutor(model, LABELS, device(config, "device-where"), steps=STEPS, guidance=3.0)
    with no_host_sync():
        x, _ = ex.run(0, summary=False)
    s = ex.summary()
    assert [d["compute"] for d in s.stats] == [d["compute"] for d in s_host.stats]
    torch.testing.assert_close(x, x_host, rtol=1e-5, atol=1e-5)
    assert s.compute_fraction >= 1.0 - 1e-12  # every block, every step (+ TeaCache's signal)
    assert s.flops_sub_batch == pytest.approx(s_host.flops)


def test_inductor_reads_the_cond_predicate_device_where_does_not(model):
    """Inductor's code for ``torch.cond`` reads the predicate on the host (``pred.item()``): the
    guard catches it. ``mode="device-where"`` compiled by inductor reads nothing."""
    from omnicache.runtime.syncguard import HostSyncError

    torch._dynamo.reset()
    config = POLICIES["fbcache1"](threshold_for(model, POLICIES["fbcache1"]))
    for mode in ("device", "device-where"):
        ex = CacheExecutor(model, LABELS, device(config, mode), steps=4, guidance=3.0)
        ex.device_forward = torch.compile(ex.device_forward, fullgraph=True)
        ex.run(0)  # compiles outside the guard
        if mode == "device":
            with pytest.raises(HostSyncError, match=r"Tensor\.item"), no_host_sync():
                ex.run(0, summary=False)
        else:
            with no_host_sync():
                ex.run(0, summary=False)
    torch._dynamo.reset()


def test_compiled_inductor(model):
    torch._dynamo.reset()
    config = device(POLICIES["fbcache1"](threshold_for(model, POLICIES["fbcache1"])))
    ex = CacheExecutor(model, LABELS, config, steps=STEPS, guidance=3.0)
    x_eager, s_eager = ex.run(0)
    ex.device_forward = torch.compile(ex.device_forward, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        x, s = ex.run(0)
    torch.testing.assert_close(x, x_eager, rtol=1e-4, atol=1e-4)
    assert [d["compute"] for d in s.stats] == [d["compute"] for d in s_eager.stats]
    torch._dynamo.reset()


def test_device_decisions_teacache_rule():
    """The core's device decision on hand-made signals: TeaCache's accumulate-and-reset, the
    forced first/last steps, and the history the summary reads."""
    dec = TeaCacheConfig(threshold=0.25, mode="device").decider(5, 2)
    dd = DeviceDecisions(dec, 5, torch.zeros(2, 1, 1), 2)
    base = torch.ones(2, 1, 1)
    for step, r in enumerate([0.0, 0.1, 0.2, 0.15, 0.0]):  # relative change vs the previous step
        sig = base * torch.tensor([1 + r, 1 + 2 * r]).view(2, 1, 1)
        dd.decide(sig)
        base = sig
    h = dd.history()
    assert [d["compute"] for d in h] == [[True, True], [False, False], [True, True], [False, True], [True, True]]
    assert h[0]["signal_rel_l1"] is None


@pytest.mark.cuda
def test_cuda_graph_captures_a_dynamic_step(tiny_dit):
    """A whole dynamic sampling step (embed, first blocks, device decision, torch.cond over the
    remaining blocks, final layer, guidance) captured once in a CUDA graph (torch.cond as CUDA
    conditional nodes) and replayed at every step: the eager device mode's decisions and output."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from torch._higher_order_ops.cudagraph_conditional_nodes import (
        ControlFlowOpWarmupDispatchMode, CUDAGraphCaptureControlFlowOpDispatchMode)

    model = copy.deepcopy(tiny_dit).cuda()
    labels = LABELS.cuda()
    config = device(FirstBlockCacheConfig(threshold=0.1))
    ex = CacheExecutor(model, labels, config, steps=STEPS, guidance=3.0)
    with torch.no_grad():
        x_eager, s_eager = ex.run(0)
        x = ex.init_noise(0)
        static_x, static_t = ex.sampler.model_input(0, x)
        static_x, static_t = static_x.clone(), static_t.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), ControlFlowOpWarmupDispatchMode():  # both branches warmed up
            ex.device_forward(static_x, static_t)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), CUDAGraphCaptureControlFlowOpDispatchMode():
            static_out = ex.device_forward(static_x, static_t)
        ex.reset_cache()  # the warm-up took a step: start the run from empty state
        with no_host_sync():
            for i in range(STEPS):
                x_model, t = ex.sampler.model_input(i, x)
                static_x.copy_(x_model)
                static_t.copy_(t)
                graph.replay()
                x = ex.sampler.step(i, x, static_out.clone())
        ex._device_wall = 0.0
        s = ex.summary()
    assert [d["compute"] for d in s.stats] == [d["compute"] for d in s_eager.stats]
    torch.testing.assert_close(x, x_eager, rtol=1e-4, atol=1e-4)
