"""pytest-benchmark suite of the ops: fused backend vs eager composition vs
torch.compile of the reference, recording GB/s.

    pytest benchmarks/test_bench_ops.py            # CPU at 4M float32, CUDA at 16M bf16 if present
    pytest benchmarks/test_bench_ops.py --benchmark-disable   # one call of each: a smoke test
"""

import pytest
import torch

import opsbench

CASES = [("cpu", torch.float32, 4 << 20)]
if torch.cuda.is_available():
    CASES += [("cuda", torch.bfloat16, 16 << 20), ("cuda", torch.float32, 16 << 20)]


def params():
    for device, dtype, numel in CASES:
        for op in opsbench.OPS:
            for variant in opsbench.variants(torch.device(device)):
                yield pytest.param(op, variant, device, dtype, numel,
                                   id=f"{op}-{variant}-{device}-{str(dtype)[6:]}-{numel}")


@pytest.mark.parametrize("op,variant,device,dtype,numel", list(params()))
def test_op(benchmark, ratio_table, op, variant, device, dtype, numel):
    args = opsbench.make_inputs(op, 4, numel, dtype, device)
    fn = opsbench.callable_for(op, variant)
    fn(*args)  # warm-up (and compile)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        fn(*args)
        sync()

    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)
    if benchmark.stats is None:  # --benchmark-disable
        return
    median = benchmark.stats.stats.median
    nbytes = opsbench.bytes_moved(op, numel, dtype)
    benchmark.extra_info.update(GBps=nbytes / median / 1e9, bytes=nbytes, numel=numel,
                                dtype=str(dtype), device=device, variant=variant)
    ratio_table.setdefault((op, device, str(dtype)[6:], numel), {})[variant] = median
