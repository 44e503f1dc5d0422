"""Measure the ``cuda`` and ``triton`` backends per op and size on this GPU and write the
table the ``auto`` backend reads (:mod:`omnicache.backend_table`).

    python benchmarks/auto_backend.py                      # writes omnicache/data/auto_backend.json
    python benchmarks/auto_backend.py --numel 65536 16777216 --out /tmp/t.json

Times exactly what ``benchmarks/bench_ops.py`` times (``opsbench`` inputs and calls, CUDA
events, median of ``--reps``, input sets rotated so small sizes do not run from L2), in
``--dtype`` (default bfloat16, the runtime's dtype). The full timings go into the file's
``measured`` field and a copy to ``benchmarks/results/auto-backend-<device>-<date>.json``.
Needs a CUDA device with both backends available.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import bench_ops  # noqa: E402
from bench_common import slug  # noqa: E402
import opsbench  # noqa: E402

import omnicache.ops as ops  # noqa: E402
from omnicache import backend_table  # noqa: E402
from omnicache.io import atomic_write_text  # noqa: E402

DEFAULT_NUMELS = [1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24, 1 << 26, 1 << 28]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=int, nargs="+", default=DEFAULT_NUMELS)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--ops", nargs="+", default=list(opsbench.OPS), choices=opsbench.OPS)
    p.add_argument("--out", type=pathlib.Path, default=backend_table.DEFAULT_PATH)
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        p.error("needs a CUDA device (the table chooses between the cuda and triton backends)")
    missing = [b for b in backend_table.TABLE_BACKENDS if b not in ops.available_backends()]
    if missing:
        p.error(f"backends not available here: {', '.join(missing)} (build the CUDA kernels, install triton)")
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name(device)
    timings: dict = {}
    for op in args.ops:
        for numel in sorted(set(args.numel)):
            numel -= numel % args.batch
            per_set = opsbench.bytes_moved(op, numel, dtype)
            # Rotate through enough input sets to exceed the L2 cache (~50 MB on H100/H200).
            n_sets = max(1, min(16, (256 << 20) // max(per_set, 1)))
            argsets = [opsbench.make_inputs(op, args.batch, numel, dtype, device, seed=s) for s in range(n_sets)]
            row = timings.setdefault(op, {}).setdefault(numel, {})
            for backend in backend_table.TABLE_BACKENDS:
                row[backend] = bench_ops.timer(device, opsbench.fused(op, backend), argsets, args.reps)
            best = min(row, key=row.get)
            print(f"{op:17s} {numel:>10d}  " + "  ".join(f"{b} {t * 1e6:9.2f} us" for b, t in row.items())
                  + f"  -> {best}", flush=True)
            del argsets
            torch.cuda.empty_cache()

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    date = datetime.date.today().isoformat()
    measured = {op: [[n, {b: t * 1e6 for b, t in row.items()}] for n, row in sorted(by.items())]
                for op, by in timings.items()}
    table = backend_table.table_from_timings(
        timings, device=name, torch_version=torch.__version__, triton_version=triton_version, date=date,
        command="python benchmarks/auto_backend.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        dtype=args.dtype, batch=args.batch, measured={"unit": "us (median)", **measured})
    text = json.dumps(table, indent=1) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, text)
    copy = bench_ops.RESULTS_DIR / f"auto-backend-{slug(name)}-{date}.json"
    copy.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(copy, text)
    backend_table.clear_cache()
    backend_table.load(args.out)  # re-read and validate what was written
    print(f"\nchoices for {name}:")
    for op, entries in table["choices"].items():
        print(f"  {op:17s} " + ", ".join(f"<= {b if b is not None else 'any'}: {k}" for b, k in entries))
    print(f"written to {args.out} and {copy}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
