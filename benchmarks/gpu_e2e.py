"""End-to-end GPU benchmark: measured vs ideal speedup of each caching policy, with host
syncs per step, peak and cache memory, eager and CUDA-graph replay.

    # DiT-XL/2: 256 tokens, batch 8 with guidance (16 rows), 50 flow steps, bf16
    python benchmarks/gpu_e2e.py --model xl2 --cuda-graphs both
    # video-scale DiT (30 blocks, width 1536, 181x181 = 32761 tokens, batch 1)
    python benchmarks/gpu_e2e.py --model video --cuda-graphs off --repeats 2
    # CPU smoke run (what tests/test_gpu_e2e_script.py runs)
    python benchmarks/gpu_e2e.py --device cpu --model tiny --steps 4

Weights are random (a speed benchmark): every linear/conv weight ~ N(0, 1/fan_in), biases
and the adaLN-Zero layers included, so nothing is timed on zeros. Per policy:

- ``compute_fraction``: FLOPs spent / uncached FLOPs (``model.flops_per_sample()`` and the
  plan, :meth:`CachePlan.compute_fraction`); ``ideal_speedup = 1 / compute_fraction``.
- ``measured_speedup``: NoCache median time / policy median time, both in the same
  ``cuda_graphs`` mode and process. Times are the whole sampling loop (all steps, embed to
  sampler update), CUDA events on GPU, ``perf_counter`` on CPU; after a warm-up run, the
  median of ``--repeats`` runs. Caches are zeroed before each run, outside the timing.
  With ``--check`` (default, except ``video``) each policy first runs through
  ``CacheExecutor.run`` and ``max_abs_diff_vs_reference`` compares every timed loop's
  output with it (0 expected on CPU; graph vs eager may differ by kernel choice on GPU).
- ``host_syncs_per_step``: on CUDA, the synchronising CUDA calls ATen reports under
  ``torch.cuda.set_sync_debug_mode("warn")`` during one extra (untimed) run, divided by
  the steps; on CPU, the tensor read-backs (``item``, ``tolist``, ``cpu``, ``bool()``...,
  the calls :mod:`omnicache.runtime.syncguard` forbids) counted by its
  ``count_host_syncs()`` (a TorchFunctionMode), i.e. the syncs the same loop would pay on
  a GPU (``host_sync_method`` says which).
- ``cuda_graphs``: True = each step of the static plan captured once into its own CUDA
  graph (all graphs in one memory pool, each step's output the next one's input, cache
  buffers and γ preallocated by the executor), the whole loop replayed; False = eager;
  None on CPU (not applicable). Dynamic policies run eager only.
- ``peak_mem_GB``: ``torch.cuda.max_memory_allocated`` over the policy's runs (weights
  included, the OmniCache calibration run excluded), 1 GB = 1e9 bytes; None on CPU.
  ``cache_mem_GB``: the executor's cache buffers (``CacheExecutor.cache_bytes``).

Policies: ``nocache``, ``fora`` (N=3, branch), ``taylorseer`` (N=3, order 2, step),
``omnicache`` (calibrated on the random-weight model itself; compute fraction 0.5 by
default), ``l2c`` and ``fbc`` (FirstBlockCache, dynamic: one sync per step). ``l2c`` is a
STAND-IN: the Learning-to-Cache router is not implemented yet, so this is a branch-level
plan with the structure of an L2C plan (cache steps alternate with full steps; at each
cache step the same set of attention/MLP branches is reused from the previous step,
middle blocks first) removing ``--l2c-removed`` (default 45%) of all branches. It measures
what such a plan costs at run time, not what a trained router would choose.

Writes ``benchmarks/results/gpu-e2e-<device>-<date>.json`` (``cpu-e2e-...`` on CPU) with
``device, model, tokens, batch, steps, results`` (+ ``torch, date, command`` and
settings); ``results`` is a list of ``{policy, compute_fraction, ideal_speedup,
measured_speedup, host_syncs_per_step, cuda_graphs, peak_mem_GB, cache_mem_GB}`` plus
``median_s, runs_s, ratio`` (measured / ideal) and checks. ``--append`` merges into an
existing file of the same model/shape (to split a long run over several commands).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import statistics
import sys
import time
import warnings

import torch
import torch.nn as nn

from omnicache.io import atomic_write_json
from omnicache.plan import CachePlan
from omnicache.policies import (
    FirstBlockCacheConfig,
    FORAConfig,
    NoCacheConfig,
    OmniCacheConfig,
    TaylorSeerConfig,
)
from omnicache.runtime.engine import calibrator
from omnicache.runtime.executor import CacheExecutor
from omnicache.runtime.model import DiT, DiTConfig
from omnicache.runtime.syncguard import count_host_syncs
from omnicache.policies.omnicache.schedule import max_reuse_steps

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_common import device_name, slug  # noqa: E402

RESULTS_DIR = pathlib.Path(__file__).parent / "results"
REQUIRED_KEYS = ("policy", "compute_fraction", "ideal_speedup", "measured_speedup", "host_syncs_per_step",
                 "cuda_graphs", "peak_mem_GB", "cache_mem_GB")

# name -> DiTConfig fields, batch, guidance, OmniCache calibration settings
MODELS = {
    # DiT-XL/2 at 256x256: 32x32x4 latent, patch 2 -> 256 tokens; batch 8 + CFG -> 16 rows.
    "xl2": dict(config=dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                            num_heads=16, num_classes=1000),
                batch=8, guidance=4.0, calibration=dict(calibration_samples=4, selection="error")),
    # Video scale (Wan2.1-1.3B-like trunk: 30 blocks, width 1536, 24 heads of 64): the DiT has
    # square latents only, so a 362x362x16 latent, patch 2 -> 181^2 = 32761 tokens (~32k).
    # Batch 1, no CFG by default (one row; --guidance 5 doubles it). Calibration on one sample
    # with curvature selection: the error-based DP would hold many 32k x 1536 drift tensors.
    "video": dict(config=dict(input_size=362, patch_size=2, in_channels=16, hidden_size=1536, depth=30,
                              num_heads=24, num_classes=1000),
                  batch=1, guidance=1.0, calibration=dict(calibration_samples=1, selection="curvature")),
    # CPU smoke size.
    "tiny": dict(config=dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2,
                             num_heads=2, num_classes=10),
                 batch=2, guidance=4.0, calibration=dict(calibration_samples=2, selection="error")),
}
POLICIES = ("nocache", "fora", "taylorseer", "omnicache", "l2c", "fbc")
DEFAULT_POLICIES = ("nocache", "fora", "taylorseer", "omnicache", "l2c")


# ------------------------------------------------------------------------------ model
def build_model(name: str, device: torch.device, dtype, seed: int = 0) -> DiT:
    """The preset with random weights (no zeros anywhere), eval mode, in ``dtype``."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = DiT(DiTConfig(**MODELS[name]["config"]))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0.0, fan_in**-0.5)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.02)
    return model.to(dtype).eval().requires_grad_(False)


# --------------------------------------------------------------------------- policies
def l2c_standin_plan(steps: int, depth: int, removed: float) -> CachePlan:
    """A branch-level plan shaped like an L2C plan (see the module docstring).

    Cache steps are the odd steps (step 0 computes, so every cache reads the step before);
    each removes the same ``n`` branches, ``n`` chosen so that ``removed`` of all
    ``steps * depth * 2`` branches are reused, taken middle blocks first (MLP before
    attention at equal distance from the middle), capped at all branches of a step.
    """
    if not 0.0 <= removed < 1.0:
        raise ValueError(f"--l2c-removed must be in [0, 1), got {removed}")
    cache_steps = [i for i in range(steps) if i % 2 == 1]
    units = sorted(((b, k) for b in range(depth) for k in (0, 1)),
                   key=lambda u: (abs(u[0] - (depth - 1) / 2), -u[1], u[0]))
    n = 0 if not cache_steps else min(2 * depth, round(removed * steps * 2 * depth / len(cache_steps)))
    drop = set(units[:n])
    compute = [[[not (i in cache_steps and (b, k) in drop) for k in (0, 1)] for b in range(depth)]
               for i in range(steps)]
    share = n * len(cache_steps) / (steps * 2 * depth)
    return CachePlan(steps, depth, "branch", compute,
                     meta={"policy": "L2C", "standin": True, "branches_removed": share,
                           "note": "stand-in with the L2C plan's structure until the router exists"})


def make_policy(name: str, args, steps: int, depth: int):
    if name == "nocache":
        return NoCacheConfig()
    if name == "fora":
        return FORAConfig(interval=3)
    if name == "taylorseer":
        return TaylorSeerConfig(interval=3, order=2)
    if name == "omnicache":
        cal = dict(MODELS[args.model]["calibration"])
        if args.omnicache_selection:
            cal["selection"] = args.omnicache_selection
        base = OmniCacheConfig(**cal)
        # Short runs (the CPU smoke test's 4 steps) cannot reach the requested fraction under
        # warmup/tail/max_consecutive: use the smallest feasible one (recorded in the result).
        most = max_reuse_steps(steps, warmup=base.warmup, tail=base.tail, max_consecutive=base.max_consecutive)
        fraction = max(args.omnicache_fraction, (steps - most) / steps)
        return OmniCacheConfig(compute_fraction=fraction, **cal)
    if name == "l2c":
        return l2c_standin_plan(steps, depth, args.l2c_removed)
    if name == "fbc":
        return FirstBlockCacheConfig()
    raise ValueError(f"unknown policy {name!r}")


# ----------------------------------------------------------------------- the loops
def step_functions(ex: CacheExecutor) -> list:
    """``x -> x_next`` per step: the static plan's ``step_fn(i)``, or the executor's ``step(i, x)``."""
    if ex.kind == "static":
        fns = [ex.step_fn(i) for i in range(ex.steps)]
        return [lambda x, f=f: f(x)[0] for f in fns]
    return [lambda x, i=i: ex.step(i, x)[0] for i in range(ex.steps)]


class EagerLoop:
    def __init__(self, ex, x0):
        self.ex, self.x0, self.fns = ex, x0, step_functions(ex)

    def prepare(self):
        self.ex.reset_cache()  # what CacheExecutor.run does first: zeroed caches, decisions restarted
        return self.x0.clone()

    def __call__(self, x):
        for f in self.fns:
            x = f(x)
        return x


class GraphLoop:
    """One CUDA graph per step, captured once, replayed in capture order (shared pool)."""

    def __init__(self, ex, x0):
        if ex.plan is None:
            raise ValueError("CUDA graphs need a static plan")
        self.ex, self.x0 = ex, x0
        fns = step_functions(ex)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: kernels compiled, handles made
            ex.reset_cache()
            x = x0.clone()
            for f in fns:
                x = f(x)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        pool = torch.cuda.graph_pool_handle()
        self.static_in = x0.clone()
        self.graphs, self.outs = [], []
        x = self.static_in
        for f in fns:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                x = f(x)
            self.graphs.append(g)
            self.outs.append(x)  # kept alive: each step's output is the next graph's input
        torch.cuda.synchronize()

    def prepare(self):
        self.ex.reset_cache()
        return None

    def __call__(self, _x):
        self.static_in.copy_(self.x0)
        for g in self.graphs:
            g.replay()
        return self.outs[-1]


def host_syncs(loop, device: torch.device) -> tuple[torch.Tensor, int, str]:
    """``(output, host syncs, method)`` of one run of ``loop`` (see the module docstring)."""
    x = loop.prepare()
    if device.type == "cuda":
        torch.cuda.synchronize()
        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = loop(x)
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.synchronize()
        n = sum("synchroniz" in str(w.message).lower() for w in caught)
        return out, n, "cuda sync_debug_mode warn"
    with count_host_syncs() as syncs:
        out = loop(x)
    return out, syncs.count, "tensor read-backs (TorchFunctionMode, cpu)"


def time_runs(loop, device: torch.device, repeats: int) -> list[float]:
    """Seconds per whole sampling run, ``repeats`` timed runs (the caller has warmed up)."""
    times = []
    for _ in range(repeats):
        x = loop.prepare()
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loop(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            loop(x)
            times.append(time.perf_counter() - t0)
    return times


# ------------------------------------------------------------------------------ main
def gb(nbytes) -> float:
    return nbytes / 1e9


def bench_policy(name, args, model, labels, device, modes, x0_seed=0):
    """Every requested mode of one policy; returns result dicts (without speedups yet)."""
    steps, depth = args.steps, len(model.blocks)
    policy = make_policy(name, args, steps, depth)
    ex = CacheExecutor(model, labels, policy, steps=steps, sampler=args.sampler, guidance=args.guidance,
                       calibrate=calibrator(model, sampler=args.sampler, guidance=args.guidance))  # OmniCache fitted here
    if device.type == "cuda":
        torch.cuda.empty_cache()
    x0 = ex.init_noise(x0_seed)
    ref = None
    if ex.plan is None or args.check:  # the executor's own loop: reference output and FLOPs
        ref, summary = ex.run(x=x0.clone())
        fraction = summary.compute_fraction
    else:  # what run() reports for a static plan, without spending a run on it
        fraction = ex.plan.compute_fraction(ex.flops)
    meta = ex.plan.meta if ex.plan is not None else {"policy": ex.policy_name}
    out = []
    for graphs in modes:
        entry = dict(policy="L2C" if name == "l2c" else ex.policy_name, compute_fraction=fraction,
                     ideal_speedup=1.0 / fraction, measured_speedup=None, host_syncs_per_step=None,
                     cuda_graphs=graphs, peak_mem_GB=None, cache_mem_GB=gb(ex.cache_bytes),
                     cache_bytes=ex.cache_bytes, key=name, granularity=ex.granularity)
        if name == "l2c":
            entry["standin"] = True
            entry["branches_removed"] = meta["branches_removed"]
        if name == "omnicache":
            entry["omnicache"] = {k: meta.get(k) for k in ("selection", "order", "compute_fraction",
                                                           "calibration_samples")}
        if graphs and ex.plan is None:
            entry["skipped"] = "dynamic policy: no CUDA-graph replay"
            out.append(entry)
            continue
        loop = None
        try:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            loop = GraphLoop(ex, x0) if graphs else EagerLoop(ex, x0)  # GraphLoop warms up itself
            if ref is None and not graphs:
                ref = loop(loop.prepare()).clone()  # warm-up run, and the reference output
            result, syncs, method = host_syncs(loop, device)  # after warm-up: no first-call syncs
            if ref is None:
                ref = result.clone()
            else:
                diff = float((result.float() - ref.float()).abs().max())
                entry["max_abs_diff_vs_reference"] = diff if math.isfinite(diff) else None
            entry["finite"] = bool(torch.isfinite(result).all())
            runs = time_runs(loop, device, args.repeats)
        except Exception as e:  # noqa: BLE001 - recorded, the other policies still run
            entry["error"] = f"{type(e).__name__}: {e}"[:500]
            print(f"  {name} cuda_graphs={graphs}: {entry['error']}", flush=True)
            out.append(entry)
            continue
        finally:
            loop = None
        entry["host_syncs_per_step"] = syncs / steps
        entry["host_sync_method"] = method
        entry["runs_s"] = runs
        entry["median_s"] = statistics.median(runs)
        if device.type == "cuda":
            entry["peak_mem_GB"] = gb(torch.cuda.max_memory_allocated())
        out.append(entry)
        print(f"  {entry['policy']:<16} graphs={graphs!s:<5} fraction {fraction:.3f} "
              f"median {entry['median_s'] * 1e3:.1f} ms  syncs/step {entry['host_syncs_per_step']:.2f}", flush=True)
    del ex
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def add_speedups(results: list[dict]) -> None:
    base = {r["cuda_graphs"]: r["median_s"] for r in results if r.get("key") == "nocache" and "median_s" in r}
    for r in results:
        b = base.get(r["cuda_graphs"])
        if b is not None and "median_s" in r:
            r["measured_speedup"] = b / r["median_s"]
            r["ratio"] = r["measured_speedup"] / r["ideal_speedup"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="xl2")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=list(DEFAULT_POLICIES))
    p.add_argument("--cuda-graphs", choices=("on", "off", "both"), default="both")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--batch", type=int, default=None, help="samples (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale, 1 = no CFG (default: the model's)")
    p.add_argument("--sampler", default="flow", choices=("flow", "ddim"))
    p.add_argument("--repeats", type=int, default=None, help="timed runs per policy (default 5 GPU, 3 CPU)")
    p.add_argument("--omnicache-fraction", type=float, default=0.5)
    p.add_argument("--omnicache-selection", choices=("error", "curvature"), default=None)
    p.add_argument("--l2c-removed", type=float, default=0.45, help="share of branches the L2C stand-in removes")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=None,
                   help="first run each policy through CacheExecutor.run and compare the timed loops' "
                        "output with it (default: on, except --model video where it costs a full run)")
    p.add_argument("--out", type=pathlib.Path, default=None)
    p.add_argument("--append", action="store_true",
                   help="merge into an existing --out of the same model/shape (NoCache may come from it)")
    args = p.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    spec = MODELS[args.model]
    args.batch = args.batch or spec["batch"]
    args.guidance = spec["guidance"] if args.guidance is None else args.guidance
    args.repeats = args.repeats or (5 if on_gpu else 3)
    if args.check is None:
        args.check = args.model != "video"
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.cuda_graphs] if on_gpu else [None]
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True

    model = build_model(args.model, device, dtype)
    cfg = model.config
    labels = torch.arange(args.batch, device=device) % cfg.num_classes
    name = device_name(device)
    date = datetime.date.today().isoformat()
    header = dict(device=name, model=args.model, tokens=cfg.num_tokens, batch=args.batch, steps=args.steps)
    out_path = args.out or RESULTS_DIR / f"{'gpu' if on_gpu else 'cpu'}-e2e-{slug(name)}-{date}.json"
    previous = []
    if args.append and out_path.exists():
        old = json.loads(out_path.read_text())
        mismatch = {k: (old.get(k), v) for k, v in header.items() if old.get(k) != v}
        if mismatch:
            p.error(f"--append: {out_path} is for another run: {mismatch}")
        previous = old["results"]
    print(f"{name}: {args.model} ({cfg.depth} blocks, width {cfg.hidden_size}, {cfg.num_tokens} tokens), "
          f"batch {args.batch}, guidance {args.guidance}, {args.steps} steps, {args.dtype}", flush=True)

    results = []
    for pol in args.policies:
        results += bench_policy(pol, args, model, labels, device, modes)
    done = {(r["key"], r["cuda_graphs"]) for r in results}
    results = [r for r in previous if (r.get("key"), r["cuda_graphs"]) not in done] + results
    order = {k: i for i, k in enumerate(POLICIES)}
    results.sort(key=lambda r: (r["cuda_graphs"] is True, order.get(r.get("key"), 99)))
    add_speedups(results)

    n_params = sum(t.numel() for t in model.parameters())
    doc = dict(header, results=results, torch=torch.__version__, date=date,
               command="python benchmarks/gpu_e2e.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               dtype=args.dtype, guidance=args.guidance, rows=args.batch * (2 if args.guidance != 1.0 else 1),
               sampler=args.sampler, repeats=args.repeats, depth=cfg.depth, hidden_size=cfg.hidden_size,
               params=n_params, weights_GB=gb(n_params * torch.empty((), dtype=dtype).element_size()),
               flops_per_row_step=model.flops_per_sample()["total"],
               target="measured/ideal >= 0.97 for static plans, 0 host syncs, CUDA graphs on (GPU)")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_path, doc, indent=1)

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    print(f"\n{'policy':<16}{'graphs':>7}{'fraction':>9}{'ideal':>8}{'measured':>9}{'ratio':>7}"
          f"{'syncs/step':>11}{'peak GB':>9}{'cache GB':>9}{'median ms':>11}")
    for r in results:
        print(f"{r['policy']:<16}{fmt(r['cuda_graphs'], ''):>7}{r['compute_fraction']:>9.3f}"
              f"{r['ideal_speedup']:>7.2f}x{fmt(r['measured_speedup'], '.2f'):>8}x{fmt(r.get('ratio'), '.3f'):>7}"
              f"{fmt(r['host_syncs_per_step'], '.2f'):>11}{fmt(r['peak_mem_GB'], '.2f'):>9}"
              f"{r['cache_mem_GB']:>9.3f}{fmt(r.get('median_s') and r['median_s'] * 1e3, '.1f'):>11}"
              + (f"  {r.get('error') or r.get('skipped')}" if r.get("error") or r.get("skipped") else ""))
    print(f"written to {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
