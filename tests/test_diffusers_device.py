"""Dynamic policies with ``mode="device"`` on tiny diffusers transformers: the host mode's
decisions and outputs, no host read over the sampling loop but ``torch.cond``'s own (none in
``mode="device-where"`` or a CUDA graph), ``torch.compile(transformer, fullgraph=True)`` with
no recompile from step to step."""

import contextlib
import dataclasses
import functools

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install omnicache[diffusers])")

import diffusers_models as dm  # noqa: E402
from compile_helpers import only_cond_reads  # noqa: E402

from omnicache.integrations import diffusers as od  # noqa: E402
from omnicache.policies import FirstBlockCacheConfig, TeaCacheConfig  # noqa: E402
from omnicache.runtime.syncguard import no_host_sync  # noqa: E402

STEPS = 8
POLICIES = {"teacache": TeaCacheConfig, "fbc": FirstBlockCacheConfig,
            "dbcache": functools.partial(FirstBlockCacheConfig, last_blocks=1, max_consecutive=2)}

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(name, config, per_sample, fn=None, guard=False):
    m, shape, inputs = dm.make(name)
    od.enable(m, config, steps=STEPS, per_sample=per_sample)
    with only_cond_reads() if guard else contextlib.nullcontext(), torch.no_grad():
        out = dm.sample(m, shape, inputs, STEPS, fn=fn(m) if fn else None)
    s = od.summary(m)
    od.disable(m)
    return out, s


def _threshold(name, policy, per_sample):
    """The median of the signal a host-mode probe (threshold 0) sees: some calls (samples) reuse."""
    _, s = _run(name, POLICIES[policy](threshold=0.0), per_sample)
    rel = [d["signal_rel_l1"] for d in s.contexts[None]["stats"][1:]]
    rel = sorted(r for v in rel for r in (v if isinstance(v, list) else [v]))
    return rel[len(rel) // 2] + 1e-7


def _decisions(s):
    return [d["compute"] for d in s.contexts[None]["stats"]]


@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "per-sample"])
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("name", ["Flux", "Wan", "DiT"])
def test_device_mode_equals_host_mode(name, policy, per_sample):
    config = POLICIES[policy](threshold=_threshold(name, policy, per_sample))
    ref, s_host = _run(name, config, per_sample)
    out, s_dev = _run(name, dataclasses.replace(config, mode="device"), per_sample, guard=True)
    dec = _decisions(s_host)
    assert _decisions(s_dev) == dec
    assert not all(map(all, dec) if per_sample else dec), "every call computed"
    if per_sample:
        assert any(0 < sum(d) < len(d) for d in dec) or any(not any(d) for d in dec), dec
    assert max((a - b).abs().max().item() for a, b in zip(ref, out)) < 1e-5
    for a, b in zip(s_dev.contexts[None]["stats"][1:], s_host.contexts[None]["stats"][1:]):
        torch.testing.assert_close(a["signal_rel_l1"], b["signal_rel_l1"], rtol=1e-5, atol=1e-7)
    assert s_dev.contexts[None]["trace"] == s_host.contexts[None]["trace"]
    assert s_dev.flops_sub_batch == pytest.approx(s_host.flops, rel=1e-9)
    if per_sample:  # the whole batch runs whenever one sample computes
        assert s_dev.flops >= s_host.flops
    else:
        assert s_dev.flops == pytest.approx(s_host.flops, rel=1e-9)


@pytest.mark.parametrize("per_sample", [False, True], ids=["batch", "per-sample"])
@pytest.mark.parametrize("name", ["Flux", "Wan"])
def test_device_where_equals_host_mode(name, per_sample):
    """``mode="device-where"``: every block runs, ``torch.where`` selects: same decisions and outputs."""
    config = FirstBlockCacheConfig(threshold=_threshold(name, "fbc", per_sample))
    ref, s_host = _run(name, config, per_sample)
    out, s = _run(name, dataclasses.replace(config, mode="device-where"), per_sample, guard=True)
    assert _decisions(s) == _decisions(s_host)
    assert max((a - b).abs().max().item() for a, b in zip(ref, out)) < 1e-5
    assert s.compute_fraction == pytest.approx(1.0)
    assert s.flops_sub_batch == pytest.approx(s_host.flops, rel=1e-9)


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("name", ["Flux", "Wan"])
def test_compile_fullgraph_no_recompile(name, policy):
    """``torch.compile(transformer, fullgraph=True)`` of two whole runs: the first call (allocating)
    and the steady state compile once each, then no recompile; equal to eager. (A host read inside
    the compiled region, ``.item()`` or ``.tolist()``, would be a graph break, which fullgraph
    refuses; the eager hooks around it read nothing but ``torch.cond``'s predicates: the eager
    run of the test above counts them.)"""
    torch._dynamo.reset()
    config = POLICIES[policy](threshold=_threshold(name, policy, True), mode="device")
    eager, s_eager = _run(name, config, True)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(sum(n.target is torch.ops.higher_order.cond for n in gm.graph.nodes))
        return gm  # the traced graph (fast on a busy CPU)

    m, shape, inputs = dm.make(name)
    od.enable(m, config, steps=STEPS, per_sample=True)
    compiled = torch.compile(m, fullgraph=True, backend=backend)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):  # the second run only replays
            out = dm.sample(m, shape, inputs, STEPS, fn=compiled)
            s = od.summary(m)
            assert _decisions(s) == _decisions(s_eager)
            assert max((a - b).abs().max().item() for a, b in zip(eager, out)) < 1e-5
    od.disable(m)
    assert len(graphs) == 2 and graphs[0] == 0 and graphs[1] > 0, graphs  # first call: no cond
    torch._dynamo.reset()


def test_device_mode_needs_steps():
    m, shape, inputs = dm.make("Flux")
    od.enable(m, FirstBlockCacheConfig(mode="device"))
    with pytest.raises(RuntimeError, match="mode='device' needs the number of steps"):
        dm.sample(m, shape, inputs, 1)
    od.disable(m)


@pytest.mark.cuda
def test_cuda_graph_captures_a_dynamic_call():
    """Flux, ``mode="device"``, per sample: after the first (allocating) call, one steady-state
    call is captured in a CUDA graph (each remaining block's torch.cond as CUDA conditional
    nodes) and replayed for every later step: the eager device mode's decisions and outputs."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from torch._higher_order_ops.cudagraph_conditional_nodes import (
        ControlFlowOpWarmupDispatchMode, CUDAGraphCaptureControlFlowOpDispatchMode)

    config = FirstBlockCacheConfig(threshold=_threshold("Flux", "fbc", True), mode="device")
    m, shape, inputs = dm.make("Flux")
    m = m.cuda()
    cuda_inputs = lambda x, t: {k: v.cuda() if torch.is_tensor(v) else v for k, v in inputs(x, t).items()}
    t_of = lambda i: torch.full((shape[0],), 999.0 * (1 - i / STEPS), device="cuda")
    od.enable(m, config, steps=STEPS, per_sample=True)
    with torch.no_grad():
        x, eager = torch.randn(shape, generator=dm._g(0)).cuda(), []
        for i in range(STEPS):
            out = m(**cuda_inputs(x, t_of(i)), return_dict=False)[0]
            eager.append(out)
            x = x - out[:, : shape[1]] / STEPS
        s_eager = od.summary(m)
        # a new run: its first call eagerly, then one graph for the steady state
        od.reset(m)
        x = torch.randn(shape, generator=dm._g(0)).cuda()
        out = m(**cuda_inputs(x, t_of(0)), return_dict=False)[0]
        outs = [out]
        x = x - out[:, : shape[1]] / STEPS
        rt = od.adapter_of(m)[1]
        ctx = rt.current
        state = [t.clone() for t in ctx.decisions.tensors()] + [cu.F.clone() for cu in ctx.units.values()]
        static_x, static_t = x.clone(), t_of(1)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), ControlFlowOpWarmupDispatchMode():  # both branches warmed up
            m(**cuda_inputs(static_x, static_t), return_dict=False)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), CUDAGraphCaptureControlFlowOpDispatchMode():
            static_out = m(**cuda_inputs(static_x, static_t), return_dict=False)[0]
        # warm-up and capture each ran the eager bookkeeping of a call: back to after call 0
        for t, v in zip([*ctx.decisions.tensors(), *(cu.F for cu in ctx.units.values())], state):
            t.copy_(v)
        del ctx.log[1:]
        ctx.step = 1
        with no_host_sync():
            for i in range(1, STEPS):
                static_x.copy_(x)
                static_t.copy_(t_of(i))
                graph.replay()
                rt.installer.before_call(m, ())  # the call's bookkeeping, as the forward hooks do
                rt.installer.after_call(m, (), None)
                out = static_out.clone()
                outs.append(out)
                x = x - out[:, : shape[1]] / STEPS
    s = od.summary(m)
    od.disable(m)
    assert _decisions(s) == _decisions(s_eager)
    assert max((a - b).abs().max().item() for a, b in zip(eager, outs)) < 1e-4
