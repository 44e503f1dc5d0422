"""Op bandwidth benchmark: every backend against the copy bandwidth measured in the
same run, the eager composition and torch.compile of the reference.

    python benchmarks/bench_ops.py                 # the device this machine has
    python benchmarks/bench_ops.py --device cpu --numel 4194304 --dtype float32

On CUDA it times with events and writes benchmarks/results/gpu-ops-<device>-<date>.json
(on CPU, cpu-ops-<cpu>-<date>.json): ``device, torch, triton, date, copy_GBps, ops``
with ``ops`` a list of ``{op, backend, dtype, numel, median_ms, GBps,
fraction_of_copy}``. Bytes are the fewest the op must move (each input read once,
each output written once); the copy moves 2 bytes per byte copied (read + write).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import re
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import opsbench  # noqa: E402

from omnicache.io import atomic_write_text  # noqa: E402

RESULTS_DIR = pathlib.Path(__file__).parent / "results"


def timer(device: torch.device, fn, argsets, reps: int) -> float:
    """Median seconds of ``fn`` over ``reps`` calls, rotating through ``argsets``."""
    for args in argsets:  # warm-up: compilation, allocator, caches
        fn(*args)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for i in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            args = argsets[i % len(argsets)]
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for i in range(reps):
            args = argsets[i % len(argsets)]
            t0 = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int, reps: int) -> float:
    """GB/s of a large device-to-device copy, counting bytes read plus written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = timer(device, lambda s, d: d.copy_(s), [(src, dst)], reps)
    return 2 * nbytes / t / 1e9


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:40]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--numel", type=int, nargs="+", help="elements per tensor (default: 16M/64M/256M on CUDA, 4M on CPU)")
    p.add_argument("--dtype", nargs="+", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=4, help="batch dim B (default 4)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per case (default 50 CUDA, 20 CPU)")
    p.add_argument("--ops", nargs="+", default=list(opsbench.OPS), choices=opsbench.OPS)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--out", type=pathlib.Path, default=None, help="JSON path (default: benchmarks/results/...)")
    args = p.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    numels = args.numel or ([16 << 20, 64 << 20, 256 << 20] if on_gpu else [4 << 20])
    dtypes = [getattr(torch, d) for d in (args.dtype or (["bfloat16", "float32"] if on_gpu else ["float32", "bfloat16"]))]
    reps = args.reps or (50 if on_gpu else 20)
    variants = [v for v in opsbench.variants(device) if not (args.no_compile and v == "compile")]

    copy_gbps = copy_bandwidth(device, (512 << 20) if on_gpu else (64 << 20), reps)
    print(f"{device_name(device)}: copy {copy_gbps:.1f} GB/s (read + write)", flush=True)
    rows = []
    for dtype in dtypes:
        for numel in numels:
            for op in args.ops:
                # Enough input sets that repeated calls do not run out of the cache.
                per_set = opsbench.bytes_moved(op, numel, dtype)
                n_sets = 1 if (not on_gpu or per_set >= (512 << 20)) else 3
                argsets = [opsbench.make_inputs(op, args.batch, numel, dtype, device, seed=s)
                           for s in range(n_sets)]
                for variant in variants:
                    t = timer(device, opsbench.callable_for(op, variant), argsets, reps)
                    gbps = per_set / t / 1e9
                    rows.append(dict(op=op, backend=variant, dtype=str(dtype).removeprefix("torch."),
                                     numel=numel, median_ms=t * 1e3, GBps=gbps,
                                     fraction_of_copy=gbps / copy_gbps))
                    print(f"  {op:17s} {rows[-1]['dtype']:9s} {numel:>10d} {variant:8s} "
                          f"{t * 1e3:9.3f} ms {gbps:8.1f} GB/s {gbps / copy_gbps:6.1%} of copy", flush=True)
                del argsets
                if on_gpu:
                    torch.cuda.empty_cache()

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    date = datetime.date.today().isoformat()
    result = dict(device=device_name(device), torch=torch.__version__, triton=triton_version,
                  date=date, copy_GBps=copy_gbps, batch=args.batch, reps=reps,
                  command="python benchmarks/bench_ops.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  ops=rows)
    out = args.out or RESULTS_DIR / f"{'gpu' if on_gpu else 'cpu'}-ops-{slug(device_name(device))}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")

    print(f"\nspeedup of each fused backend (median time ratio), written to {out}")
    print(f"{'op':17s} {'dtype':9s} {'numel':>10s} {'backend':8s} {'of copy':>8s} {'vs eager':>9s} {'vs compile':>11s}")
    table = {(r["op"], r["dtype"], r["numel"], r["backend"]): r for r in rows}
    ratios_eager = []
    for r in rows:
        if r["backend"] in ("eager", "compile"):
            continue
        key = (r["op"], r["dtype"], r["numel"])
        eager, comp = table.get((*key, "eager")), table.get((*key, "compile"))
        ve = eager["median_ms"] / r["median_ms"] if eager else float("nan")
        vc = comp["median_ms"] / r["median_ms"] if comp else float("nan")
        ratios_eager.append(ve)
        print(f"{r['op']:17s} {r['dtype']:9s} {r['numel']:>10d} {r['backend']:8s} "
              f"{r['fraction_of_copy']:8.1%} {ve:8.2f}x {vc:10.2f}x")
    if ratios_eager:
        geo = statistics.geometric_mean(ratios_eager)
        print(f"geometric mean speedup vs eager: {geo:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
