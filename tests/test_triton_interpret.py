"""Triton track: the Triton launchers in ``omnicache.kernels`` against ``reference.py``.

Runs on CPU under the Triton interpreter (``TRITON_INTERPRET=1``, which must be set
before triton is imported, so this file runs in its own pytest process:
``TRITON_INTERPRET=1 pytest tests/test_triton_interpret.py``), or on a CUDA GPU.
The reference is evaluated in float64. Tolerances:

- elementwise outputs: within one ulp of the dtype of the correctly rounded float64
  result, plus the float32 arithmetic error (a few float32 eps of the terms'
  magnitude). One ulp also covers the interpreter, which truncates when casting to
  bfloat16.
- statistics: ``rtol 1e-4`` plus ``1e-5 x`` the sum of the terms' magnitudes.
"""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (set before triton is imported) or a CUDA GPU",
                allow_module_level=True)
pytest.importorskip("triton")

from omnicache import reference as R  # noqa: E402
from omnicache.kernels import apply_residual as k_apply  # noqa: E402
from omnicache.kernels import rel_l1 as k_rel_l1  # noqa: E402
from omnicache.kernels import store_residual as k_store  # noqa: E402
from omnicache.kernels import token_update as k_token  # noqa: E402
from omnicache.kernels import trajectory_stats as k_traj  # noqa: E402
from omnicache.kernels import utils as k_utils  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MANTISSA_BITS = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}
EPS32 = 2.0**-24
F64 = torch.float64

# Odd shapes, one spanning several default elementwise blocks, and one spanning several
# chunks (with a partial last one) when the reductions run with SMALL blocking.
SHAPES = [(1, 1), (3, 5), (2, 7, 13), (5, 123), (4, 3, 33), (2, 5001)]
# (block, chunk): the defaults, and a small one giving several blocks per chunk and
# several chunks per sample on the shapes above.
BLOCKINGS = {"default": (k_utils.REDUCE_BLOCK, k_utils.REDUCE_CHUNK), "small": (128, 1024)}
EMPTY_SHAPES = [(0, 4), (3, 0), (2, 0, 5)]


# ----------------------------------------------------------------------------- inputs

def make(shape, dtype, seed, strided=False):
    """Random normal tensor; ``strided``: a non-contiguous view with that shape."""
    g = torch.Generator().manual_seed(seed)
    if strided:
        t = torch.randn(*shape[:-1], 2 * shape[-1], generator=g)[..., ::2]
        if len(shape) >= 3:  # a transposed view as well
            t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    else:
        t = torch.randn(*shape, generator=g)
    return t.to(dtype).to(DEVICE)


def d(t):
    """float64 copy (reference input)."""
    return None if t is None else t.detach().to("cpu", F64)


# ------------------------------------------------------------------------- tolerances

def ulp(x64, dtype):
    """Spacing of ``dtype`` at magnitude ``|x64|`` (subnormal spacing below the normals)."""
    tiny = torch.finfo(dtype).tiny
    return torch.exp2(torch.floor(torch.log2(x64.abs().clamp_min(tiny))) - MANTISSA_BITS[dtype])


def assert_elementwise(got, ref64, scale64, dtype, what):
    """``got`` within one ulp of ``round(ref64)`` plus float32 error on ``scale64``."""
    got64 = d(got)
    rounded = ref64.to(dtype).to(F64)
    err = (got64 - rounded).abs()
    tol = ulp(torch.maximum(rounded.abs(), got64.abs()), dtype) + 8 * EPS32 * scale64
    bad = err > tol
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.numel()} elements off; worst err "
        f"{float((err - tol).max()):.3g} over tol; got {got64[bad][:4].tolist()} "
        f"want {ref64[bad][:4].tolist()}")


def assert_stats(got, ref64, scale64, what):
    assert got.dtype == torch.float32 and got.shape == ref64.shape, (what, got.dtype, got.shape)
    got64 = d(got)
    tol = 1e-4 * ref64.abs() + 1e-5 * scale64
    assert ((got64 - ref64).abs() <= tol).all(), f"{what}: got {got64} want {ref64}"


def per_sample_sum(t64):
    return t64.reshape(t64.shape[0], -1).sum(1)


# ---------------------------------------------------------------- apply_residual_

GAMMA_CASES = ["no-correction", "gamma-None", "gamma-scalar", "gamma-per-sample"]


def apply_inputs(shape, dtype, strided, case, seed=0):
    hidden = make(shape, dtype, seed)
    residual = make(shape, dtype, seed + 1, strided)
    correction = None if case == "no-correction" else make(shape, dtype, seed + 2, strided)
    gamma = None
    if case == "gamma-scalar":
        gamma = torch.tensor(0.75, device=DEVICE)
    elif case == "gamma-per-sample":
        gamma = (torch.arange(shape[0], dtype=torch.float32, device=DEVICE) - 1.5) * 0.5
    return hidden, residual, correction, gamma


def check_apply(hidden, residual, correction, gamma, block):
    h64 = d(hidden)
    scale = h64.abs() + d(residual).abs()
    if correction is not None:
        g = 1.0 if gamma is None else d(gamma).expand(hidden.shape[0]).reshape(
            -1, *([1] * (hidden.dim() - 1)))
        scale = scale + (g * d(correction)).abs()
    R.apply_residual_(h64, d(residual), d(correction), d(gamma), acc=F64)
    k_apply.apply_residual_(hidden, residual, correction, gamma, block=block)
    assert_elementwise(hidden, h64, scale, hidden.dtype, "hidden")


@pytest.mark.parametrize("block", [k_utils.ELEMENTWISE_BLOCK, 64], ids=["block-default", "block-64"])
@pytest.mark.parametrize("case", GAMMA_CASES)
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apply_residual(dtype, shape, strided, case, block):
    if block == 64 and shape[-1] > 1000:
        block = 512  # same paths (N >= BLOCK, several blocks), far fewer interpreted programs
    check_apply(*apply_inputs(shape, dtype, strided, case), block=block)


def test_apply_residual_gamma_batch_one_and_offset_target():
    # gamma [1] with B = 1 and a contiguous target that starts inside its storage.
    storage = make((3, 4, 50), torch.float32, 7)
    hidden = storage[1:2]
    before = storage.clone()
    residual = make((1, 4, 50), torch.float32, 8)
    correction = make((1, 4, 50), torch.float32, 9)
    gamma = torch.tensor([-2.0], device=DEVICE)
    check_apply(hidden, residual, correction, gamma, block=64)
    assert torch.equal(storage[0], before[0]) and torch.equal(storage[2], before[2])


ORDER2_CASES = {  # (correction, correction2, gate)
    "c1-c2": (True, True, False), "c2-gate": (False, True, True), "c1-gate": (True, False, True),
    "c1-c2-gate": (True, True, True), "gate": (False, False, True),
}


@pytest.mark.parametrize("block", [k_utils.ELEMENTWISE_BLOCK, 64], ids=["block-default", "block-64"])
@pytest.mark.parametrize("gamma_mode", ["none", "shared", "per-sample"])
@pytest.mark.parametrize("case", ORDER2_CASES.values(), ids=ORDER2_CASES.keys())
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("shape", [s for s in SHAPES if len(s) >= 2], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apply_residual_order2_and_gate(dtype, shape, strided, case, gamma_mode, block):
    if block == 64 and shape[-1] > 1000:
        block = 512
    with_c1, with_c2, with_gate = case
    hidden = make(shape, dtype, 0)
    residual = make(shape, dtype, 1, strided)
    c1 = make(shape, dtype, 2, strided) if with_c1 else None
    c2 = make(shape, dtype, 3, strided) if with_c2 else None
    gate = make((shape[0], shape[-1]), dtype, 4, strided) if with_gate else None
    gamma = None
    if gamma_mode != "none" and (with_c1 or with_c2):
        g = torch.linspace(-1.5, 2.0, 2 * shape[0], device=DEVICE)
        if with_c2:
            gamma = g[:2].contiguous() if gamma_mode == "shared" else g.reshape(shape[0], 2)
        else:
            gamma = torch.tensor(0.75, device=DEVICE) if gamma_mode == "shared" else g[: shape[0]].contiguous()
    h64 = d(hidden)
    R.apply_residual_(h64, d(residual), d(c1), d(gamma), d(c2), d(gate), acc=F64)
    # Magnitude bound on the float32 terms: |h| + |gate| (|r| + |γ1 c1| + |γ2 c2|), γ <= 2.
    terms = d(residual).abs() + sum(2 * d(c).abs() for c in (c1, c2) if c is not None)
    if gate is not None:
        terms = terms * d(gate).abs().reshape(shape[0], *[1] * (len(shape) - 2), shape[-1])
    k_apply.apply_residual_(hidden, residual, c1, gamma, c2, gate, block=block)
    assert_elementwise(hidden, h64, d(make(shape, dtype, 0)).abs() + terms, dtype, "hidden")


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
def test_apply_residual_empty(shape):
    hidden = torch.empty(shape, device=DEVICE)
    k_apply.apply_residual_(hidden, torch.empty(shape, device=DEVICE),
                            torch.empty(shape, device=DEVICE),
                            torch.ones(shape[0], device=DEVICE))
    assert hidden.shape == shape


# ---------------------------------------------------------------- store_residual_

def check_store(cache, delta, out, inp, blocking):
    dtype = cache.dtype
    old64, out64, inp64 = d(cache), d(out), d(inp)
    c64 = old64.clone()
    delta64 = None if delta is None else d(delta)
    want = R.store_residual_(c64, delta64, out64, inp64, acc=F64)
    block, chunk = blocking
    got = k_store.store_residual_(cache, delta, out, inp, block=block, chunk=chunk)
    new_scale = out64.abs() + inp64.abs()
    assert_elementwise(cache, c64, new_scale, dtype, "cache")
    if delta is not None:
        assert_elementwise(delta, delta64, new_scale + old64.abs(), dtype, "delta")
    lin = per_sample_sum(new_scale + old64.abs())
    quad = per_sample_sum((new_scale + old64.abs()) ** 2)
    scale = torch.stack([lin, lin, quad, quad], 1)
    assert_stats(got, want, scale, "store_residual_ stats")
    return got


@pytest.mark.parametrize("blocking", BLOCKINGS.values(), ids=BLOCKINGS.keys())
@pytest.mark.parametrize("with_delta", [True, False], ids=["delta", "no-delta"])
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_store_residual(dtype, shape, strided, with_delta, blocking):
    cache = make(shape, dtype, 10)
    delta = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE) if with_delta else None
    check_store(cache, delta, make(shape, dtype, 11, strided), make(shape, dtype, 12, strided),
                blocking)


@pytest.mark.parametrize("blocking", BLOCKINGS.values(), ids=BLOCKINGS.keys())
@pytest.mark.parametrize("mode", ["no-inp", "delta2", "no-inp-delta2"])
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_store_residual_no_inp_and_delta2(dtype, shape, strided, mode, blocking):
    cache, delta_old = make(shape, dtype, 10), make(shape, dtype, 13)
    out = make(shape, dtype, 11, strided)
    inp = None if "no-inp" in mode else make(shape, dtype, 12, strided)
    delta = delta_old.clone()
    delta2 = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE) if "delta2" in mode else None
    old64, c64, dl64 = d(cache), d(cache), d(delta)
    d2_64 = None if delta2 is None else d(delta2)
    want = R.store_residual_(c64, dl64, d(out), d(inp), d2_64, acc=F64)
    block, chunk = blocking
    got = k_store.store_residual_(cache, delta, out, inp, delta2, block=block, chunk=chunk)
    new_scale = d(out).abs() + (0 if inp is None else d(inp).abs())
    assert_elementwise(cache, c64, new_scale, dtype, "cache")
    assert_elementwise(delta, dl64, new_scale + old64.abs(), dtype, "delta")
    if delta2 is not None:
        assert_elementwise(delta2, d2_64, new_scale + old64.abs() + d(delta_old).abs(), dtype, "delta2")
    lin = per_sample_sum(new_scale + old64.abs())
    quad = per_sample_sum((new_scale + old64.abs()) ** 2)
    assert_stats(got, want, torch.stack([lin, lin, quad, quad], 1), "store_residual_ stats")


def test_store_residual_unchanged_residual_gives_zero_change():
    out, inp = make((3, 700), torch.float32, 13), make((3, 700), torch.float32, 14)
    cache = out - inp
    delta = torch.empty_like(cache)
    got = k_store.store_residual_(cache, delta, out, inp, block=64, chunk=256)
    assert torch.equal(delta, torch.zeros_like(delta))
    assert torch.equal(got[:, 0], torch.zeros(3, device=DEVICE))
    assert torch.equal(got[:, 2], torch.zeros(3, device=DEVICE))


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
def test_store_residual_empty(shape):
    e = lambda: torch.empty(shape, device=DEVICE)  # noqa: E731
    got = k_store.store_residual_(e(), e(), e(), e())
    assert got.dtype == torch.float32 and torch.equal(got, torch.zeros(shape[0], 4, device=DEVICE))


# ---------------------------------------------------------------- trajectory_stats

def check_traj(x_next, x, x_prev, blocking):
    xn64, x64, xp64 = d(x_next), d(x), d(x_prev)
    want = R.trajectory_stats(xn64, x64, xp64, acc=F64)
    got = k_traj.trajectory_stats(x_next, x, x_prev, block=blocking[0], chunk=blocking[1])
    m1, m0 = xn64.abs() + x64.abs(), x64.abs() + xp64.abs()
    scale = torch.stack([per_sample_sum(m1 * m1), per_sample_sum(m0 * m0), per_sample_sum(m1 * m0)], 1)
    assert_stats(got, want, scale, "trajectory_stats")
    return got


@pytest.mark.parametrize("blocking", BLOCKINGS.values(), ids=BLOCKINGS.keys())
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_trajectory_stats(dtype, shape, strided, blocking):
    check_traj(make(shape, dtype, 20, strided), make(shape, dtype, 21),
               make(shape, dtype, 22, strided), blocking)


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
def test_trajectory_stats_empty(shape):
    e = lambda: torch.empty(shape, device=DEVICE)  # noqa: E731
    got = k_traj.trajectory_stats(e(), e(), e())
    assert got.dtype == torch.float32 and torch.equal(got, torch.zeros(shape[0], 3, device=DEVICE))


# ---------------------------------------------------------------- rel_l1

def check_rel_l1(a, b, blocking):
    a64, b64 = d(a), d(b)
    want = R.rel_l1(a64, b64, acc=F64)
    got = k_rel_l1.rel_l1(a, b, block=blocking[0], chunk=blocking[1])
    scale = torch.stack([per_sample_sum(a64.abs() + b64.abs()), per_sample_sum(b64.abs())], 1)
    assert_stats(got, want, scale, "rel_l1")
    return got


@pytest.mark.parametrize("blocking", BLOCKINGS.values(), ids=BLOCKINGS.keys())
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rel_l1(dtype, shape, strided, blocking):
    check_rel_l1(make(shape, dtype, 30, strided), make(shape, dtype, 31), blocking)


def test_rel_l1_of_equal_inputs_is_zero():
    a = make((2, 3, 333), torch.bfloat16, 32)
    got = k_rel_l1.rel_l1(a, a.clone(), block=64, chunk=256)
    assert torch.equal(got[:, 0], torch.zeros(2, device=DEVICE))


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
def test_rel_l1_empty(shape):
    got = k_rel_l1.rel_l1(torch.empty(shape, device=DEVICE), torch.empty(shape, device=DEVICE))
    assert got.dtype == torch.float32 and torch.equal(got, torch.zeros(shape[0], 2, device=DEVICE))


# ---------------------------------------------------------------- reductions, shared

def test_default_chunking_with_several_chunks():
    # 40000 > REDUCE_CHUNK elements per sample: several stage-1 chunks and stage 2 at
    # the shipped sizes.
    assert 40000 > 2 * k_utils.REDUCE_CHUNK
    shape, blocking = (2, 40000), BLOCKINGS["default"]
    check_rel_l1(make(shape, torch.bfloat16, 40), make(shape, torch.bfloat16, 41), blocking)
    check_traj(*(make(shape, torch.float16, s) for s in (42, 43, 44)), blocking)


def test_stage2_with_more_chunks_than_one_step(monkeypatch):
    # More chunks per sample than SUM_BLOCK: stage 2 loops over several steps.
    monkeypatch.setattr(k_utils, "SUM_BLOCK", 8)
    n_chunks = 3 * k_utils.SUM_BLOCK + 5
    shape, blocking = (2, 16 * n_chunks - 5), (16, 16)
    check_rel_l1(make(shape, torch.float32, 50), make(shape, torch.float32, 51), blocking)


def test_sum_partials_in_fixed_order():
    part = make((3, 700, 4), torch.float32, 52)
    got = k_utils.sum_partials(part)
    torch.testing.assert_close(d(got), d(part).sum(1), rtol=1e-5, atol=1e-5 * 700)
    assert torch.equal(got, k_utils.sum_partials(part.clone()))


@pytest.mark.parametrize("blocking", BLOCKINGS.values(), ids=BLOCKINGS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reductions_bitwise_deterministic(dtype, blocking):
    shape = (3, 2, 700)
    block, chunk = blocking
    a, b, c = (make(shape, dtype, s, strided=True) for s in (60, 61, 62))
    assert torch.equal(k_rel_l1.rel_l1(a, b, block=block, chunk=chunk),
                       k_rel_l1.rel_l1(a, b, block=block, chunk=chunk))
    assert torch.equal(k_traj.trajectory_stats(a, b, c, block=block, chunk=chunk),
                       k_traj.trajectory_stats(a, b, c, block=block, chunk=chunk))
    cache0 = make(shape, dtype, 63)
    results = []
    for _ in range(2):
        cache, delta = cache0.clone(), torch.empty_like(cache0)
        stats = k_store.store_residual_(cache, delta, a, b, block=block, chunk=chunk)
        results.append((stats, cache, delta))
    for x, y in zip(*results):
        assert torch.equal(x, y)
    hidden = [cache0.clone() for _ in range(2)]
    for h in hidden:
        k_apply.apply_residual_(h, a, b, torch.linspace(-1, 1, 3, device=DEVICE), block=512)
    assert torch.equal(hidden[0], hidden[1])


# ---------------------------------------------------------------- token ops (ToCa)

TOKEN_BLOCKINGS = {"default": {}, "small": dict(tokens=4, block_c=8)}


@pytest.mark.parametrize("blocking", TOKEN_BLOCKINGS.values(), ids=TOKEN_BLOCKINGS.keys())
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 9, 13, 12), (3, 37, 20, 0), (2, 21, 33, 40)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_update(dtype, shape, strided, blocking):
    b, n, c, k = shape
    g = torch.Generator().manual_seed(k)
    index = torch.randint(0, n, (b, k), generator=g).to(DEVICE)  # tokens repeat: last wins
    cache, hidden = make((b, n, c), dtype, 80), make((b, n, c), dtype, 81, strided)
    values = make((b, k, c), dtype, 82, strided)
    c64 = d(cache)
    want = R.token_update_(c64, index.cpu(), d(values), d(hidden), acc=F64)
    small = dict(blocking, index_block=8) if blocking else {}
    got = k_token.token_update_(cache, index, values, hidden, **small)
    scale = d(hidden).abs() + d(cache).abs() + (d(values).abs().amax() if k else 0)
    assert_elementwise(got, want, scale, dtype, "out")
    assert_elementwise(cache, c64, scale, dtype, "cache")
    rows = k_token.gather_tokens(hidden, index, **blocking)
    assert torch.equal(rows.cpu(), R.gather_tokens(hidden.cpu(), index.cpu()))


def test_token_update_index_out_of_range_flags_on_the_device():
    cache, hidden, values = make((2, 9, 5), torch.float32, 83), make((2, 9, 5), torch.float32, 84), \
        make((2, 3, 5), torch.float32, 85)
    before = cache.clone()
    index = torch.tensor([[0, 8, 8], [1, 9, 2]], device=DEVICE)
    out = k_token.token_update_(cache, index, values, hidden, tokens=4, block_c=4, index_block=2)
    assert out.isnan().all() and torch.equal(cache, before)
    rows = k_token.gather_tokens(hidden, index, tokens=2, block_c=4)
    assert rows[1, 1].isnan().all() and torch.equal(rows[0], hidden[0, [0, 8, 8]])


@pytest.mark.parametrize("bad", [(48, 128), (64, 100), (0, 0)])
def test_bad_blocking_is_refused(bad):
    x = make((2, 10), torch.float32, 70)
    with pytest.raises(ValueError, match="block|chunk"):
        k_rel_l1.rel_l1(x, x, block=bad[0], chunk=bad[1])
