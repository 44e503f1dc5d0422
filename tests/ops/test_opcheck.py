"""torch.library.opcheck on every op: schema, fake impl, autograd registration, AOT."""

import pytest
import torch

from opsutil import DTYPES, INTERPRET, make

SHAPE = (3, 5, 7)


def op_device(namespace: str) -> str:
    """The C++ ops are checked on CPU in the main process; the Triton ops on CPU in
    the interpreter process, and on CUDA where there is a GPU."""
    if namespace == "omnicache":
        if INTERPRET:
            pytest.skip("the C++ ops are opchecked in the main (non-interpreter) process")
        return "cpu"
    if INTERPRET:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("Triton ops on CPU run in the TRITON_INTERPRET=1 process")


def samples(dtype):
    x = [make(SHAPE, dtype, seed=s) for s in range(5)]
    gate = make((SHAPE[0], SHAPE[-1]), dtype, seed=9)
    return {
        "apply_residual_": [
            (x[0].clone(), x[1]),
            (x[0].clone(), x[1], x[2]),
            (x[0].clone(), x[1], x[2], torch.tensor(0.5)),
            (x[0].clone(), x[1], x[2], torch.rand(SHAPE[0])),
            (x[0].clone(), x[1], x[2], torch.rand(SHAPE[0], 2), x[3]),
            (x[0].clone(), x[1], None, torch.rand(2), x[3], gate),
            (x[0].clone(), x[1], None, None, None, gate),
        ],
        "store_residual_": [
            (x[0].clone(), None, x[1], x[2]),
            (x[0].clone(), torch.empty_like(x[0]), x[1], x[2]),
            (x[0].clone(), None, x[1], None),
            (x[0].clone(), x[4].clone(), x[1], x[2], torch.empty_like(x[0])),
            (x[0].clone(), x[4].clone(), x[1], None, torch.empty_like(x[0])),
        ],
        "trajectory_stats": [(x[0], x[1], x[2])],
        "rel_l1": [(x[0], x[1])],
        # [B, N, C] = SHAPE; index [B, 4] with a repeated token, and K = 0.
        "token_update_": [
            (x[0].clone(), INDEX, make((SHAPE[0], 4, SHAPE[2]), dtype, seed=7), x[1]),
            (x[0].clone(), INDEX[:, :0], make((SHAPE[0], 0, SHAPE[2]), dtype, seed=7), x[1]),
        ],
        "gather_tokens": [(x[0], INDEX), (x[1], INDEX[:, :0])],
    }


INDEX = torch.tensor([[0, 4, 4, 2], [1, 1, 1, 1], [3, 0, 2, 4]])
OPS = ["apply_residual_", "store_residual_", "trajectory_stats", "rel_l1", "token_update_", "gather_tokens"]


@pytest.mark.parametrize("namespace", ["omnicache", "omnicache_triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opname", OPS)
def test_opcheck(namespace, opname, dtype):
    import omnicache.ops  # noqa: F401  (registers both namespaces)

    device = op_device(namespace)
    op = getattr(getattr(torch.ops, namespace), opname)
    for args in samples(dtype)[opname]:
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op, args)
