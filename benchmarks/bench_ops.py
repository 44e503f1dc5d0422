"""Op bandwidth benchmark: every backend against the copy bandwidth measured in the
same run, the eager composition and torch.compile of the reference.

    python benchmarks/bench_ops.py                 # the device this machine has
    python benchmarks/bench_ops.py --device cpu --numel 4194304 67108864 \
        --dtype float32 float16 bfloat16 --threads 1 2

Each case (op x dtype x size x threads) times its variants interleaved: every round
calls the fused backend(s), the eager composition, torch.compile of the reference and
a copy of one tensor of the same size (``dst.copy_(src)``), in a rotating order, so
drift and neighbours on a shared machine hit all of them alike; medians are reported.
On CUDA it times with events and writes benchmarks/results/gpu-ops-<device>-<date>.json
(on CPU, cpu-ops-<cpu>-<date>.json): ``device, torch, triton, date, threads, copy_GBps,
ops`` with ``ops`` a list of ``{op, backend, dtype, numel, threads, median_ms, times_ms,
GBps, fraction_of_copy}``. Bytes are the fewest the op must move (each input read once,
each output written once); the copy moves 2 bytes per byte copied (read + write), and
``fraction_of_copy`` compares with the copy timed in the same rounds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import opsbench  # noqa: E402
from bench_common import device_name, slug  # noqa: E402

from omnicache.io import atomic_write_text  # noqa: E402

RESULTS_DIR = pathlib.Path(__file__).parent / "results"


def _time_once(device: torch.device, fn, args) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def timer(device: torch.device, fn, argsets, reps: int) -> float:
    """Median seconds of ``fn`` over ``reps`` calls, rotating through ``argsets``."""
    for args in argsets:  # warm-up: compilation, allocator, caches
        fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return statistics.median(_time_once(device, fn, argsets[i % len(argsets)]) for i in range(reps))


def interleaved(device: torch.device, fns: dict, argsets: dict, reps: int) -> dict:
    """Seconds of every call: ``{name: [t, ...]}``, the names taking turns each round
    (the order rotates by one per round). ``argsets[name]`` lists the input sets."""
    names = list(fns)
    for name in names:  # warm-up: compilation, allocator, caches
        for args in argsets[name]:
            fns[name](*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = {name: [] for name in names}
    for r in range(reps):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            sets = argsets[name]
            times[name].append(_time_once(device, fns[name], sets[r % len(sets)]))
    return times


def copy_bandwidth(device: torch.device, nbytes: int, reps: int) -> float:
    """GB/s of a large device-to-device copy, counting bytes read plus written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = timer(device, lambda s, d: d.copy_(s), [(src, dst)], reps)
    return 2 * nbytes / t / 1e9


def cpu_flags() -> list[str]:
    """The SIMD extensions the omnicache CPU kernels can use on this CPU."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16") if f in have]
    except OSError:
        pass
    return []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--numel", type=int, nargs="+", help="elements per tensor (default: 16M/64M/256M on CUDA, 4M on CPU)")
    p.add_argument("--dtype", nargs="+", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=4, help="batch dim B (default 4)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds per case (default 50 CUDA, 15 CPU)")
    p.add_argument("--ops", nargs="+", default=list(opsbench.CASES), choices=opsbench.CASES)
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="CPU threads, one pass each (default: torch's current setting)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--no-eager", action="store_true", help="skip the eager baseline (slow on CPU)")
    p.add_argument("--out", type=pathlib.Path, default=None, help="JSON path (default: benchmarks/results/...)")
    p.add_argument("--table", type=pathlib.Path, default=None, help="print the table of a result JSON and exit")
    args = p.parse_args(argv)
    if args.table is not None:
        print_table(json.loads(args.table.read_text())["ops"])
        return 0

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    numels = args.numel or ([16 << 20, 64 << 20, 256 << 20] if on_gpu else [4 << 20])
    dtypes = [getattr(torch, d) for d in (args.dtype or (["bfloat16", "float32"] if on_gpu else ["float32", "bfloat16"]))]
    reps = args.reps or (50 if on_gpu else 15)
    threads_list = args.threads or [torch.get_num_threads()]
    variants = [v for v in opsbench.variants(device)
                if not (args.no_compile and v == "compile") and not (args.no_eager and v == "eager")]
    # One compiled graph per (op, shape, dtype): far more than dynamo's default limit.
    torch._dynamo.config.cache_size_limit = 256
    torch._dynamo.config.accumulated_cache_size_limit = 4096

    rows = []
    copies = []
    for threads in threads_list:
        if not on_gpu:
            torch.set_num_threads(threads)
        print(f"{device_name(device)}: {threads} thread(s)", flush=True)
        for dtype in dtypes:
            for numel in numels:
                for op in args.ops:
                    # Enough input sets that repeated calls do not run out of the cache.
                    per_set = opsbench.bytes_moved(op, numel, dtype)
                    n_sets = 1 if (not on_gpu or per_set >= (512 << 20)) else 3
                    argsets = [opsbench.make_inputs(op, args.batch, numel, dtype, device, seed=s)
                               for s in range(n_sets)]
                    src = argsets[0][0]  # a full-size tensor of the case
                    fns = {v: opsbench.callable_for(op, v) for v in variants}
                    fns["copy"] = lambda s, d: d.copy_(s)
                    sets = {v: argsets for v in variants}
                    sets["copy"] = [(src.contiguous(), torch.empty_like(src))]
                    times = interleaved(device, fns, sets, reps)
                    copy_t = statistics.median(times["copy"])
                    copy_gbps = 2 * src.numel() * src.element_size() / copy_t / 1e9
                    dname = str(dtype).removeprefix("torch.")
                    copies.append(dict(op=op, dtype=dname, numel=numel, threads=threads,
                                       median_ms=copy_t * 1e3, GBps=copy_gbps,
                                       times_ms=[t * 1e3 for t in times["copy"]]))
                    for variant in variants:
                        t = statistics.median(times[variant])
                        gbps = per_set / t / 1e9
                        rows.append(dict(op=op, backend=variant, dtype=dname, numel=numel,
                                         threads=threads, median_ms=t * 1e3, GBps=gbps,
                                         fraction_of_copy=gbps / copy_gbps,
                                         times_ms=[x * 1e3 for x in times[variant]]))
                        print(f"  {op:27s} {dname:9s} {numel:>10d} {variant:8s} "
                              f"{t * 1e3:9.3f} ms {gbps:8.1f} GB/s {gbps / copy_gbps:6.1%} of copy "
                              f"({copy_gbps:.1f} GB/s)", flush=True)
                    del argsets, sets, src
                    if on_gpu:
                        torch.cuda.empty_cache()

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    date = datetime.date.today().isoformat()
    copy_all = statistics.median(c["GBps"] for c in copies) if copies else float("nan")
    result = dict(device=device_name(device).split(" (")[0], cpu_flags=None if on_gpu else cpu_flags(),
                  torch=torch.__version__, triton=triton_version, date=date,
                  timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  threads=threads_list, copy_GBps=copy_all, batch=args.batch, reps=reps,
                  interleaved=True,
                  command="python benchmarks/bench_ops.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  copies=copies, ops=rows)
    threads_tag = "-".join(map(str, threads_list))
    out = args.out or RESULTS_DIR / (f"gpu-ops-{slug(device_name(device))}-{date}.json" if on_gpu else
                                     f"cpu-ops-{slug(device_name(device).split(' (')[0])}-{threads_tag}-threads-{date}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    print(f"\nwritten to {out}")
    print_table(rows)
    return 0


def paired_ratio(base: dict, fused: dict) -> float:
    """Median over the rounds of base time / fused time in the same round: robust to the
    load of a shared machine changing between rounds."""
    return statistics.median(b / f for b, f in zip(base["times_ms"], fused["times_ms"]))


def print_table(rows: list[dict]) -> None:
    """Per fused backend: median time and its ratio to each baseline (>1: fused faster):
    ratio of medians, median of per-round (paired) ratios, and ratio of the fastest
    calls (on a contended machine the calls that were not descheduled)."""
    print(f"{'op':27s} {'dtype':9s} {'numel':>10s} {'thr':>3s} {'backend':8s} {'us':>10s} "
          f"{'vs eager':>9s} {'vs compile':>11s} {'(paired)':>9s} {'(min)':>7s} {'of copy':>8s}")
    table = {(r["op"], r["dtype"], r["numel"], r["threads"], r["backend"]): r for r in rows}
    ratios_eager = []
    for r in rows:
        if r["backend"] in ("eager", "compile"):
            continue
        key = (r["op"], r["dtype"], r["numel"], r["threads"])
        eager, comp = table.get((*key, "eager")), table.get((*key, "compile"))
        ve = eager["median_ms"] / r["median_ms"] if eager else float("nan")
        vc = comp["median_ms"] / r["median_ms"] if comp else float("nan")
        vp = paired_ratio(comp, r) if comp else float("nan")
        vm = min(comp["times_ms"]) / min(r["times_ms"]) if comp else float("nan")
        if eager:
            ratios_eager.append(ve)
        print(f"{r['op']:27s} {r['dtype']:9s} {r['numel']:>10d} {r['threads']:>3d} {r['backend']:8s} "
              f"{r['median_ms'] * 1e3:10.1f} {ve:8.2f}x {vc:10.2f}x {vp:8.2f}x {vm:6.2f}x "
              f"{r['fraction_of_copy']:8.1%}")
    if ratios_eager:
        print(f"geometric mean speedup vs eager: {statistics.geometric_mean(ratios_eager):.2f}x")


if __name__ == "__main__":
    sys.exit(main())
