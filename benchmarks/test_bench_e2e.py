"""End-to-end sampling on the embedded default model, per policy: measured vs ideal speedup.

    pytest benchmarks/test_bench_e2e.py [--benchmark-json=benchmarks/results/e2e-<device>.json]

Ideal speedup = 1 / compute_fraction (FLOPs spent / uncached FLOPs); measured speedup =
uncached wall time / cached wall time, both from this run (best of ``ROUNDS``, the
executor's own ``wall_s``: the sampling loop only). DESIGN's target: measured >= 0.9 x
ideal on CPU, >= 0.97 x on GPU. ``OMNICACHE_BENCH_SAMPLES`` / ``_STEPS`` / ``_DEVICE``
change the workload (CFG doubles the rows).
"""

import os

import pytest
import torch

from omnicache.api import generate
from omnicache.policies import (
    DeltaDiTConfig,
    FirstBlockCacheConfig,
    FORAConfig,
    NoCacheConfig,
    TaylorSeerConfig,
    TeaCacheConfig,
)
from omnicache.runtime.default import default_info, load_default

SAMPLES = int(os.environ.get("OMNICACHE_BENCH_SAMPLES", "16"))
STEPS = int(os.environ.get("OMNICACHE_BENCH_STEPS", "50"))
DEVICE = os.environ.get("OMNICACHE_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
ROUNDS = 2

POLICIES = {
    "FORA(N=3)": FORAConfig(interval=3),
    "FORA(N=3, step)": FORAConfig(interval=3, granularity="step"),
    "DeltaDiT(N=2)": DeltaDiTConfig(interval=2),
    "TaylorSeer(N=3, O=2)": TaylorSeerConfig(interval=3, order=2),
    "TeaCache(0.05)": TeaCacheConfig(threshold=0.05),
    "FirstBlockCache(0.1)": FirstBlockCacheConfig(threshold=0.1),
}


def best_run(policy, model, labels, guidance):
    """Best-of-ROUNDS sampling-loop wall time and the summary of the last round."""
    walls = []
    for _ in range(ROUNDS):
        summary = generate(model, labels, policy=policy, steps=STEPS, guidance=guidance, seed=0).summary
        walls.append(summary.wall_s)
    return min(walls), summary


@pytest.fixture(scope="module")
def bench(request):
    model = load_default(device=DEVICE)
    guidance = default_info()["default_guidance"]
    labels = [i % model.config.num_classes for i in range(SAMPLES)]
    generate(model, labels, steps=3, guidance=guidance)  # warm-up
    nocache_wall, _ = best_run(NoCacheConfig(), model, labels, guidance)
    rows = []
    yield model, labels, guidance, nocache_wall, rows
    header = f"e2e on {DEVICE}: {SAMPLES} samples x {STEPS} steps, CFG {guidance}, uncached {nocache_wall:.3f}s"
    lines = [header, f"{'policy':<22}{'fraction':>9}{'ideal':>8}{'measured':>10}{'ratio':>7}{'cache MB':>10}"]
    lines += [f"{n:<22}{f:>9.3f}{i:>7.2f}x{m:>9.2f}x{m / i:>7.2f}{mb:>10.2f}" for n, f, i, m, mb in rows]
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + "\n".join(lines))


@pytest.mark.parametrize("name", list(POLICIES))
def test_e2e(benchmark, bench, name):
    model, labels, guidance, nocache_wall, rows = bench
    walls = []

    def run():
        summary = generate(model, labels, policy=POLICIES[name], steps=STEPS, guidance=guidance, seed=0).summary
        walls.append(summary.wall_s)
        return summary

    summary = benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    ideal = 1.0 / summary.compute_fraction
    measured = nocache_wall / min(walls)
    benchmark.extra_info.update(
        policy=name, device=DEVICE, samples=SAMPLES, steps=STEPS, compute_fraction=summary.compute_fraction,
        ideal_speedup=ideal, measured_speedup=measured, ratio=measured / ideal, cache_bytes=summary.cache_bytes,
        uncached_wall_s=nocache_wall, wall_s=min(walls), torch=torch.__version__)
    rows.append((name, summary.compute_fraction, ideal, measured, summary.cache_bytes / 2**20))
