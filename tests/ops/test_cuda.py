"""The GPU track: CUDA and Triton backends on CUDA tensors against the reference,
opcheck, determinism and CUDA-graph capture and replay of every op."""

import pytest
import torch

import omnicache.ops as ops
import test_apply_residual
import test_rel_l1
import test_store_residual
import test_token_update
import test_trajectory_stats
from opsutil import DTYPES, backend, gpu_backends, make

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SHAPES = [(1, 1), (3, 5), (2, 7, 13), (5, 123), (4, 3, 33), (2, 70001), (1, 1 << 20)]


@pytest.fixture(params=gpu_backends() or ["none"])
def gpu_backend(request):
    if request.param == "none":
        pytest.skip("no GPU backend available")
    with backend(request.param):
        yield request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("strided", [False, True])
def test_ops_match_reference(gpu_backend, shape, dtype, strided):
    for gamma_mode in ("none", "scalar", "per_sample"):
        test_apply_residual.run_case(shape, dtype, 1, strided=strided, correction=gamma_mode != "none",
                                     gamma_mode=gamma_mode, device="cuda")
        if len(shape) >= 2:
            for c1, c2, gate in ((True, True, False), (False, True, True), (True, False, True),
                                 (True, True, True), (False, False, True)):
                test_apply_residual.run_case(shape, dtype, 1, strided=strided, correction=c1,
                                             gamma_mode=gamma_mode, correction2=c2, gate=gate,
                                             device="cuda")
    for with_delta in (False, True):
        test_store_residual.run_case(shape, dtype, 2, strided=strided, with_delta=with_delta,
                                     device="cuda")
        test_store_residual.run_case(shape, dtype, 2, strided=strided, with_delta=with_delta,
                                     with_inp=False, device="cuda")
        test_store_residual.run_case(shape, dtype, 2, strided=strided, with_delta=True,
                                     with_inp=with_delta, with_delta2=True, device="cuda")
    test_trajectory_stats.run_case(shape, dtype, 3, strided=strided, device="cuda")
    test_rel_l1.run_case(shape, dtype, 4, strided=strided, device="cuda")


@pytest.mark.parametrize("dtype", DTYPES)
def test_reductions_bitwise_on_repeat(gpu_backend, dtype):
    xs = [make((3, 300001), dtype, seed=s, device="cuda") for s in range(3)]
    first = [ops.trajectory_stats(*xs), ops.rel_l1(xs[0], xs[1])]
    second = [ops.trajectory_stats(*xs), ops.rel_l1(xs[0], xs[1])]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def capture(body):
    """(graph, outputs) of ``body`` captured in a CUDA graph, after a warm-up call (Triton
    compiles, allocator pools) on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = body()
    return graph, outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_capture_and_replay(gpu_backend, dtype):
    """All four ops captured in one graph, replayed on new inputs copied in place."""
    shape = (4, 4096)
    h, r, c = (make(shape, dtype, seed=s, device="cuda") for s in range(3))
    cache, delta = make(shape, dtype, seed=3, device="cuda"), torch.zeros(shape, dtype=dtype, device="cuda")
    gamma = torch.rand(shape[0], device="cuda")

    def body():
        s = ops.store_residual_(cache, delta, r, c)
        ops.apply_residual_(h, cache, delta, gamma)
        return s, ops.trajectory_stats(h, r, c), ops.rel_l1(h, r)

    graph, outs = capture(body)

    for seed in (10, 20):
        new = [make(shape, dtype, seed=seed + i, device="cuda") for i in range(5)]
        for dst, src in zip((h, r, c, cache, delta), new):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        # Eager run on the replay's inputs with the reference backend.
        hh, cc, dd = new[0].clone(), new[3].clone(), new[4].clone()
        with backend("torch"):
            s = ops.store_residual_(cc, dd, new[1], new[2])
            ops.apply_residual_(hh, cc, dd, gamma)
            want = (s, ops.trajectory_stats(hh, new[1], new[2]), ops.rel_l1(hh, new[1]))
        tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
        torch.testing.assert_close(h, hh, **tol)
        torch.testing.assert_close(cache, cc, **tol)
        for got, exp in zip(outs, want):
            torch.testing.assert_close(got, exp, rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("opname", ["apply_residual_", "store_residual_", "trajectory_stats", "rel_l1",
                                    "token_update_", "gather_tokens"])
def test_opcheck_cuda_kernels(opname):
    if "cuda" not in ops.available_backends():
        pytest.skip("omnicache._C was built without CUDA kernels")
    import test_opcheck

    for args in test_opcheck.samples(torch.bfloat16)[opname]:
        args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(getattr(torch.ops.omnicache, opname), args)


def test_compile_fullgraph_on_cuda(gpu_backend):
    import test_compile

    torch._dynamo.reset()
    eager = {k: v.cuda() for k, v in test_compile.inputs(torch.bfloat16).items()}
    compiled = {k: v.cuda() for k, v in test_compile.inputs(torch.bfloat16).items()}
    want = test_compile.cache_step(**eager)
    got = torch.compile(test_compile.cache_step, fullgraph=True)(**compiled)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


TOKEN_SHAPES = [(1, 1, 1, 1), (2, 7, 13, 5), (3, 37, 64, 40), (2, 300, 130, 45), (1, 4096, 128, 614)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", TOKEN_SHAPES, ids=str)
@pytest.mark.parametrize("strided", [False, True])
def test_token_ops_match_reference(gpu_backend, shape, dtype, strided):
    """Vector (C a multiple of 16 bytes) and scalar paths, repeated tokens (last wins),
    and gather_tokens of a strided view."""
    for unique in (False, True):
        test_token_update.run_case(shape, dtype, 5, strided=strided, unique=unique, device="cuda")
    b, n, c, k = shape
    x = make((b, 2 * n, c), dtype, seed=6, device="cuda")[:, ::2]
    index = test_token_update.make_index(b, n, k, 7, device="cuda")
    want = torch.stack([x[i, index[i]] for i in range(b)])
    assert torch.equal(ops.gather_tokens(x, index), want)


def test_token_ops_index_out_of_range_on_the_device(gpu_backend):
    """No host check on a GPU (no sync): out all NaN and cache untouched; NaN rows."""
    cache, hidden = (make((2, 50, 64), torch.bfloat16, seed=s, device="cuda") for s in (1, 2))
    values = make((2, 3, 64), torch.bfloat16, seed=3, device="cuda")
    before = cache.clone()
    for bad in (50, -1):
        index = torch.tensor([[0, 1, 2], [4, bad, 4]], device="cuda")
        out = ops.token_update_(cache, index, values, hidden)
        assert out.isnan().all() and torch.equal(cache, before)
        rows = ops.gather_tokens(hidden, index)
        assert rows[1, 1].isnan().all() and torch.equal(rows[0], hidden[0, :3])


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_update_bitwise_on_repeat_with_duplicates(gpu_backend, dtype):
    g = torch.Generator().manual_seed(0)
    index = torch.randint(0, 2000, (3, 5000), generator=g).cuda()
    values = make((3, 5000, 96), dtype, seed=1, device="cuda")
    hidden, cache0 = (make((3, 2000, 96), dtype, seed=s, device="cuda") for s in (2, 3))
    results = []
    for _ in range(3):
        cache = cache0.clone()
        results.append((ops.token_update_(cache, index, values, hidden), cache))
    for out, cache in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(cache, results[0][1])


def test_token_ops_cuda_graph_capture_and_replay(gpu_backend):
    cache, hidden = (make((2, 256, 128), torch.bfloat16, seed=s, device="cuda") for s in (1, 2))
    index = torch.randint(0, 256, (2, 40), device="cuda")

    graph, out = capture(lambda: ops.token_update_(cache, index, ops.gather_tokens(hidden, index) * 2, hidden))
    for seed in (10, 20):
        new = [make((2, 256, 128), torch.bfloat16, seed=seed + i, device="cuda") for i in range(2)]
        index.copy_(torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(seed)))
        cache.copy_(new[0])
        hidden.copy_(new[1])
        graph.replay()
        torch.cuda.synchronize()
        want_cache = new[0].clone()
        with backend("torch"):
            want = ops.token_update_(want_cache, index, ops.gather_tokens(new[1], index) * 2, new[1])
        assert torch.equal(out, want) and torch.equal(cache, want_cache)
