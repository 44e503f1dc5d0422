"""The cost of a cached step: ``mode="device"`` against the host-decision mode and against
diffusers' own FirstBlockCache (``diffusers.hooks``), on one diffusers Flux transformer.

    OMP_NUM_THREADS=1 python benchmarks/device_mode.py          # ~2 min on one busy CPU thread
    python benchmarks/device_mode.py --quick                    # a smoke run (tiny model, few reps)

Three systems run First-Block Cache with the same threshold on copies of the same model
(same weights, same noise, a small Euler loop, one decision per call for the whole batch):

- ``diffusers-fbc``: ``diffusers.hooks.apply_first_block_cache`` (decides on the host);
- ``host``: ``omnicache.integrations.diffusers.enable(FirstBlockCacheConfig(...))``, one host
  sync per call (``relative_change``);
- ``device``: the same with ``mode="device"``: no sync; each remaining block goes through
  ``torch.cond`` (eager here: ``torch.cond`` runs its dynamo-traced graph);
- ``device-where``: the same decision, every block computed and selected (``torch.where``);
- ``host+compile`` / ``device+compile``: the two modes under ``torch.compile`` (``--compile``
  backend, default ``aot_eager``; the device mode with ``fullgraph=True``, the host mode
  breaking the graph at its sync).

Their decisions are recorded per call and must agree (checked; the result file says so).
The runs are interleaved (``host``, ``device``, ``diffusers-fbc``, ``host``, ...), every call
timed with ``perf_counter``; the table gives medians over the repetitions of a cached call
(the rest of the stack reused), a computing call, and the whole run. Writes
``benchmarks/results/device-mode-cpu-<date>.json`` (CPU, torch and diffusers versions, date,
raw per-call timings and decisions) and prints the table in Markdown.

    python benchmarks/device_mode.py --flops     # per-sample decisions: where-mix vs sub-batch FLOPs

``--flops``: on the embedded default model (8 samples, 50 flow steps, guidance 2), the
compute fraction ``mode="device"`` spends with per-sample decisions (the whole batch runs
whenever one sample computes, ``torch.where`` keeps the others' cache) against the host
mode's sub-batches at the same decisions (``RunSummary.flops_sub_batch``); writes
``benchmarks/results/device-mode-flops-<date>.json``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_common import cpu_name  # noqa: E402

from omnicache.io import atomic_write_text  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def make_flux(quick: bool, seed: int = 0):
    """A small random Flux transformer and its inputs (batch 2)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    if quick:
        dims = dict(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                    joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
        side, text, channels = 4, 5, 4
    else:
        dims = dict(num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=4,
                    joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=[8, 12, 12])
        side, text, channels = 16, 16, 16
    m = FluxTransformer2DModel(patch_size=1, in_channels=channels, **dims).eval()
    g = torch.Generator().manual_seed(seed + 1)
    enc = torch.randn(2, text, dims["joint_attention_dim"], generator=g)
    pooled = torch.randn(2, dims["pooled_projection_dim"], generator=g)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(side)), torch.arange(float(side)),
                                         indexing="ij"), -1).reshape(-1, 3)
    inputs = lambda x, t: dict(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled,
                               timestep=t, img_ids=img_ids, txt_ids=torch.zeros(text, 3), return_dict=False)
    return m, (2, side * side, channels), inputs


def sample(model, shape, inputs, steps, seed=0):
    """A small Euler loop; returns (per-call seconds, final x)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    times = []
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((shape[0],), 1.0 - i / steps)
            t0 = time.perf_counter()
            out = model(**inputs(x, t))[0]
            times.append(time.perf_counter() - t0)
            x = x - out / steps
    return times, x


class Systems:
    """The three systems on copies of one model; each run returns (times, decisions, x)."""

    def __init__(self, quick, steps, threshold, backend=None):
        from diffusers.hooks import FirstBlockCacheConfig as DiffusersFBC
        from diffusers.hooks import apply_first_block_cache
        from diffusers.hooks.first_block_cache import FBCHeadBlockHook

        from omnicache.integrations import diffusers as od
        from omnicache.policies import FirstBlockCacheConfig

        base, self.shape, self.inputs = make_flux(quick)
        self.steps, self.od = steps, od
        self.models, self.fns = {}, {}
        for mode in ("host", "device", "device-where"):
            m = copy.deepcopy(base)
            od.enable(m, FirstBlockCacheConfig(threshold=threshold, mode=mode), steps=steps)
            self.models[mode] = self.fns[mode] = m
            if backend and mode != "device-where":  # the device mode in one graph; the host mode breaks the graph at its sync
                m = copy.deepcopy(base)
                od.enable(m, FirstBlockCacheConfig(threshold=threshold, mode=mode), steps=steps)
                self.models[f"{mode}+compile"] = m
                self.fns[f"{mode}+compile"] = torch.compile(m, fullgraph=mode == "device", backend=backend)
        m = copy.deepcopy(base)
        apply_first_block_cache(m, DiffusersFBC(threshold=threshold))
        self.models["diffusers-fbc"] = m
        self.fbc_decisions = []
        orig = FBCHeadBlockHook._should_compute_remaining_blocks
        record = self.fbc_decisions

        def spy(hook, residual):  # diffusers' own decision, recorded
            record.append(bool(orig(hook, residual)))
            return record[-1]
        FBCHeadBlockHook._should_compute_remaining_blocks = spy
        self.restore = lambda: setattr(FBCHeadBlockHook, "_should_compute_remaining_blocks", orig)

    def run(self, name):
        m, fn = self.models[name], self.fns.get(name, self.models[name])
        if name == "diffusers-fbc":
            self.fbc_decisions.clear()
            with m.cache_context("bench"):
                times, x = sample(m, self.shape, self.inputs, self.steps)
            decisions = list(self.fbc_decisions)  # one per call (the first: nothing to compare, computes)
        else:
            self.od.reset(m)
            times, x = sample(fn, self.shape, self.inputs, self.steps)
            trace = self.od.summary(m).contexts[None]["trace"]
            decisions = [bool(row[-1]) for row in trace]
        return times, decisions, x


def pick_threshold(quick, steps):
    """The median of the host mode's relative change: about half of the calls reuse."""
    from omnicache.integrations import diffusers as od
    from omnicache.policies import FirstBlockCacheConfig

    m, shape, inputs = make_flux(quick)
    od.enable(m, FirstBlockCacheConfig(threshold=0.0), steps=steps)
    sample(m, shape, inputs, steps)
    rel = sorted(d["signal_rel_l1"] for d in od.summary(m).contexts[None]["stats"][1:])
    od.disable(m)
    return rel[len(rel) // 2] + 1e-6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 repetitions (a smoke run)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--compile", default="aot_eager", metavar="BACKEND",
                    help="also time both modes under torch.compile with this backend ('' for none; "
                         "default aot_eager: inductor takes minutes per graph on a busy 2-core CPU)")
    ap.add_argument("--flops", action="store_true", help="only the per-sample FLOP comparison (see above)")
    ap.add_argument("--out", type=pathlib.Path, default=None, help="result JSON (default under benchmarks/results)")
    args = ap.parse_args(argv)
    if args.flops:
        return flops_comparison(args.out, *((2, 6) if args.quick else ()))
    steps = args.steps or (6 if args.quick else 12)
    reps = args.reps or (2 if args.quick else 7)
    torch.set_num_threads(1)
    threshold = pick_threshold(args.quick, steps)
    systems = Systems(args.quick, steps, threshold, args.compile or None)
    names = ["host", "device", "device-where", "diffusers-fbc"] + (["host+compile", "device+compile"] if args.compile else [])
    raw = {n: [] for n in names}
    try:
        for rep in range(reps + 1):  # repetition 0 warms up (allocation, compiles, dynamo traces torch.cond)
            for n in names:
                times, decisions, x = systems.run(n)
                if rep:
                    raw[n].append({"times_s": times, "decisions": decisions})
    finally:
        systems.restore()
    decisions = {n: raw[n][0]["decisions"] for n in names}
    same = all(r["decisions"] == decisions["host"] for n in names for r in raw[n])
    rows = []
    for n in names:
        cached = [t for r in raw[n] for t, d in zip(r["times_s"], r["decisions"]) if not d]
        computed = [t for r in raw[n] for t, d in zip(r["times_s"], r["decisions"]) if d]
        rows.append({"system": n,
                     "cached_call_ms": statistics.median(cached) * 1e3 if cached else None,
                     "computing_call_ms": statistics.median(computed) * 1e3 if computed else None,
                     "run_ms": statistics.median(sum(r["times_s"]) for r in raw[n]) * 1e3,
                     "cached_calls_per_run": decisions[n].count(False)})
    host = rows[0]
    for r in rows:
        r["cached_call_vs_host"] = (r["cached_call_ms"] / host["cached_call_ms"]
                                    if r["cached_call_ms"] and host["cached_call_ms"] else None)
    result = {
        "benchmark": "device-mode cached step (First-Block Cache on a diffusers Flux transformer)",
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__, "python": sys.version.split()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick, "compile_backend": args.compile or None, "steps": steps, "repetitions": reps, "threshold": threshold,
        "batch": systems.shape[0], "tokens": systems.shape[1], "decisions": decisions,
        "same_decisions": same, "table": rows, "raw": raw,
        "command": "OMP_NUM_THREADS=1 python benchmarks/device_mode.py " + " ".join(argv or sys.argv[1:]),
    }
    out = args.out or RESULTS / f"device-mode-cpu-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"wrote {out}")
    return result


def flops_comparison(out=None, samples=8, steps=50):
    """Compute fractions of the where-mix (device) and of sub-batches (host) at the same decisions."""
    from omnicache.policies import FirstBlockCacheConfig, TeaCacheConfig
    from omnicache.runtime.default import load_default
    from omnicache.runtime.executor import CacheExecutor

    torch.set_num_threads(1)
    model = load_default()
    labels = torch.arange(samples) % 10
    rows = []
    for config in (FirstBlockCacheConfig(threshold=0.1), FirstBlockCacheConfig(threshold=0.2),
                   TeaCacheConfig(threshold=0.1), TeaCacheConfig(threshold=0.3)):
        host = CacheExecutor(model, labels, config, steps=steps, guidance=2.0).run(0)[1]
        ex = CacheExecutor(model, labels, dataclasses.replace(config, mode="device"), steps=steps, guidance=2.0)
        dev = ex.run(0)[1]
        same = [d["compute"] for d in dev.stats] == [d["compute"] for d in host.stats]
        rows.append({"policy": f"{type(config).__name__.removesuffix('Config')}({config.threshold})",
                     "same_decisions": same, "host_sub_batch": host.compute_fraction,
                     "device_where_mix": dev.compute_fraction,
                     "device_flops_sub_batch": dev.flops_sub_batch / dev.flops_uncached,
                     "extra_flops": dev.flops / dev.flops_sub_batch})
    result = {"benchmark": "per-sample decisions: torch.where mix (mode='device') vs sub-batches (host)",
              "model": "embedded default DiT", "samples": samples, "steps": steps, "guidance": 2.0,
              "torch": torch.__version__, "cpu": cpu_name(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "rows": rows, "command": "python benchmarks/device_mode.py --flops"}
    out = out or RESULTS / f"device-mode-flops-{datetime.date.today().isoformat()}.json"
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    lines = ["| policy | host: sub-batches | device: where-mix | extra FLOPs | same decisions |", "|---|---:|---:|---:|---|"]
    lines += [f"| {r['policy']} | {r['host_sub_batch']:.3f} | {r['device_where_mix']:.3f} | {r['extra_flops']:.2f}x | "
              f"{r['same_decisions']} |" for r in rows]
    print("\n".join(lines))
    print(f"wrote {out}")
    return result


def table(result) -> str:
    fmt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)
    lines = [f"{result['cpu']}, {result['threads']} thread, torch {result['torch']}, "
             f"diffusers {result['diffusers']}; {result['steps']} calls per run, "
             f"{result['repetitions']} repetitions interleaved; same decisions: {result['same_decisions']}",
             "", "| system | cached call (ms) | vs host | computing call (ms) | run (ms) | cached calls |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in result["table"]:
        lines.append(f"| {r['system']} | {fmt(r['cached_call_ms'])} | {fmt(r['cached_call_vs_host'], '{:.2f}x')} | "
                     f"{fmt(r['computing_call_ms'])} | {fmt(r['run_ms'], '{:.1f}')} | {r['cached_calls_per_run']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
