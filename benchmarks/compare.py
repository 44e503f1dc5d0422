"""OmniCache against the caching baselines at equal compute, on the embedded default model.

    OMP_NUM_THREADS=1 python benchmarks/compare.py            # ~35 min on one CPU thread
    python benchmarks/compare.py --quick                      # a smoke run (few samples, one target)

For each sampler (rectified-flow Euler and DDIM, 50 steps, guidance = the model's) and
each target compute fraction (0.6, 0.5, 0.4), every method is measured on the same 64
samples (classes in turn, noise seed 0) against uncached sampling: PSNR, SSIM, class
accuracy of the digit classifier, TFLOPs spent, measured wall time and speedup (uncached
wall / cached wall, same process, one thread).

How each method reaches a target:

- static baselines (FORA, Δ-DiT, TaylorSeer order 1 and 2): every (interval, warm-up)
  setting (Δ-DiT also its group size) whose exact compute fraction is within ±0.03 of
  the target is tried on a *tuning* batch (16 samples, noise seed 2000), and the best
  PSNR there is measured on the evaluation batch; with none inside ±0.03, the nearest
  fraction (``omnicache.tuning.scan``). The reported fraction is the actual one.
- dynamic baselines (TeaCache, FirstBlockCache): the threshold is bisected with
  ``omnicache.evaluate.tune_to_fraction`` (stopping within ±0.03) on the evaluation batch,
  which is the only way to know their fraction; TeaCache's polynomial is fitted on a
  calibration batch that is not the evaluation batch (``Bench.fit_teacache``).
- OmniCache: ``OmniCacheConfig(compute_fraction=target)`` calibrated on its own batch
  (20 samples, noise seed 1234), in three forms: reuse only (DP schedule, no
  correction), + correction (the default), + filtering. More ablation rows (uniform
  schedule, curvature cost, first order, open-loop γ) at 0.5 and 0.4.
- Learning-to-Cache: ``L2CConfig(compute_fraction=target)``: the router is trained on the
  model's own trajectories (its seed 0, 64 samples; a full step every 2 steps at 0.6,
  every 3 below) and its β threshold calibrated to the target; also with OmniCache's
  closed-loop γ fitted on the same plan. Then L2C at its own operating point (threshold
  0.5), with FORA, TaylorSeer order 2 and OmniCache at that fraction.

Writes ``benchmarks/results/omnicache-comparison.{json,md,png}`` and prints the tables; the
verdicts, explanations and plot are ``benchmarks/compare_report.py``'s.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import pathlib
import platform
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_common import cpu_name  # noqa: E402
from compare_report import (ablation_summary, explanation, l2c_verdicts, markdown_table,  # noqa: E402
                            pareto_plot, verdicts)

from omnicache import metrics  # noqa: E402
from omnicache.api import generate  # noqa: E402
from omnicache.evaluate import Bench, format_table, public_row, tune_to_fraction  # noqa: E402
from omnicache.io import atomic_write_text  # noqa: E402
from omnicache.policies import (DeltaDiTConfig, FirstBlockCacheConfig, FORAConfig, L2CConfig,  # noqa: E402
                                OmniCacheConfig, TaylorSeerConfig, TeaCacheConfig)
from omnicache.runtime.default import load_classifier, load_default  # noqa: E402
from omnicache.tuning import scan  # noqa: E402

TARGETS = (0.6, 0.5, 0.4)
SAMPLERS = ("flow", "ddim")
TOLERANCE = 0.03
TUNE_SAMPLES, TUNE_SEED = 16, 2000

# OmniCache forms: (row label, config fields); the first three are the main table.
OMNI_MAIN = [("OmniCache reuse only", dict(correction=False)),
             ("OmniCache + correction", dict()),
             ("OmniCache + correction + filtering", dict(filtering=True))]
OMNI_ABLATION = [("ablation: uniform schedule", dict(selection="uniform")),
                 ("ablation: curvature cost", dict(selection="curvature")),
                 ("ablation: first order", dict(order=1)),
                 ("ablation: open-loop gamma", dict(fit="open"))]
ABLATION_TARGETS = (0.5, 0.4)


class MemoBench(Bench):
    """A :class:`Bench` that runs each config once: the threshold search's runs are the
    measured ones."""

    def __post_init__(self):
        self._memo = {}
        super().__post_init__()

    def _run(self, policy):
        key = "uncached" if policy is None else policy
        if key not in self._memo:
            self._memo[key] = super()._run(policy)
        return self._memo[key]

    def compute_fraction(self, config) -> float:
        if getattr(config, "kind", "static") == "dynamic":
            return self._run(config).summary.compute_fraction
        return config.plan(self.steps, len(self.model.blocks)).compute_fraction(self.model.flops_per_sample())


# ------------------------------------------------------------------ baselines
def static_candidates(name: str):
    """Every setting of a static baseline that the search may pick."""
    for interval, warmup in itertools.product(range(2, 13), range(11)):
        if name == "fora":
            yield FORAConfig(interval=interval, warmup=warmup)
        elif name == "delta-dit":
            for group in (4, 6, 8):
                yield DeltaDiTConfig(interval=interval, warmup=warmup, group_size=group)
        elif name == "taylorseer-o1":
            yield TaylorSeerConfig(interval=interval, order=1, warmup=warmup)
        elif name == "taylorseer-o2":
            yield TaylorSeerConfig(interval=interval, order=2, warmup=warmup)


def tune_static(bench: MemoBench, tune_ref, tune_labels, name: str, target: float):
    """``(setting, settings tried)``: the static setting near ``target`` that is best on the
    tuning batch (see the module doc; :func:`omnicache.tuning.scan`)."""
    flops = bench.model.flops_per_sample()
    depth = len(bench.model.blocks)

    def tuning_psnr(config):
        out = generate(bench.model, tune_labels, policy=config, steps=bench.steps, sampler=bench.sampler,
                       guidance=bench.guidance, seed=TUNE_SEED)
        return float(metrics.psnr(out.samples, tune_ref).mean())

    return scan(static_candidates(name), lambda c: c.plan(bench.steps, depth).compute_fraction(flops), target,
                TOLERANCE, score=tuning_psnr)


def label(name: str, config) -> str:
    if isinstance(config, (FORAConfig, TaylorSeerConfig)):
        return f"{name}(N={config.interval},w={config.warmup})"
    if isinstance(config, DeltaDiTConfig):
        return f"{name}(N={config.interval},w={config.warmup},g={config.group_size})"
    if isinstance(config, (TeaCacheConfig, FirstBlockCacheConfig)):
        return f"{name}(thr={config.threshold:.4g})"
    return name


def row_of(bench, method: str, target: float, config, retime: bool = True, **extra) -> dict:
    """``bench.measure`` plus, with ``retime``, one more timed run: wall = the faster of the two
    (the machine is shared; the samples are identical), speedup against the faster of two
    uncached runs."""
    row = bench.measure(config)
    if retime:
        again = generate(bench.model, bench.labels, policy=config, steps=bench.steps, sampler=bench.sampler,
                         guidance=bench.guidance, seed=bench.seed)
        row["wall_s"] = min(row["wall_s"], again.summary.wall_s)
    row["speedup"] = bench.reference_wall / row["wall_s"]
    row.update(method=method, target=target, policy=label(method, config), **extra)
    return row


# ------------------------------------------------------------------------ main
def run_sampler(model, classifier, sampler: str, args, log) -> list[dict]:
    labels = torch.arange(args.samples) % 10
    bench = MemoBench(model, classifier, labels, steps=args.steps, sampler=sampler, seed=0,
                      guidance=model.default_guidance)
    again = generate(model, labels, steps=args.steps, sampler=sampler, guidance=bench.guidance, seed=0)
    bench.reference_wall = min(bench.reference.summary.wall_s, again.summary.wall_s)
    rows = [dict(bench.uncached_row(), wall_s=bench.reference_wall, method="uncached", target=1.0,
                 kind="reference")]
    log(f"[{sampler}] uncached: {bench.reference_wall:.2f} s")
    tune_labels = torch.arange(TUNE_SAMPLES) % 10
    tune_ref = generate(model, tune_labels, steps=args.steps, sampler=sampler, guidance=bench.guidance,
                        seed=TUNE_SEED).samples
    coefficients = bench.fit_teacache()
    targets = args.targets
    for target in targets:
        for name in ("fora", "delta-dit", "taylorseer-o1", "taylorseer-o2"):
            t0 = time.perf_counter()
            config, tried = tune_static(bench, tune_ref, tune_labels, name, target)
            rows.append(row_of(bench, name, target, config, kind="baseline", tried=tried))
            log(f"[{sampler} {target}] {rows[-1]['policy']}: {rows[-1]['compute_fraction']:.3f} "
                f"{rows[-1]['psnr']:.2f} dB ({time.perf_counter() - t0:.0f} s)")
        for name, sets in (("teacache", ["coefficients=" + ",".join(repr(c) for c in coefficients)]),
                           ("fbcache", [])):
            t0 = time.perf_counter()
            config = tune_to_fraction(bench, name, target, sets, tolerance=3 * TOLERANCE)
            rows.append(row_of(bench, name, target, config, kind="baseline"))
            log(f"[{sampler} {target}] {rows[-1]['policy']}: {rows[-1]['compute_fraction']:.3f} "
                f"{rows[-1]['psnr']:.2f} dB ({time.perf_counter() - t0:.0f} s)")
        forms = OMNI_MAIN + (OMNI_ABLATION if target in ABLATION_TARGETS and not args.no_ablation else [])
        for method, fields in forms:
            config = OmniCacheConfig(compute_fraction=target, **fields)
            t0 = time.perf_counter()
            plan = bench.resolve(config)  # calibrated once, held by the bench
            calibrate_s = time.perf_counter() - t0
            row = row_of(bench, method, target, config, retime=not method.startswith("ablation"),
                         kind="omnicache", calibrate_s=calibrate_s,
                         schedule="".join("C" if r[0][0] else "." for r in plan.compute))
            row["policy"] = "omnicache(" + ",".join(f"{k}={v}" for k, v in fields.items()) + ")"
            rows.append(row)
            log(f"[{sampler} {target}] {method}: {row['compute_fraction']:.3f} {row['psnr']:.2f} dB "
                f"(calibration {calibrate_s:.0f} s)")
        if not args.no_l2c:
            rows.extend(l2c_rows(bench, target, l2c_refresh(target), log))
    if not args.no_l2c:
        rows.extend(l2c_native_rows(bench, tune_ref, tune_labels, log))
    return rows


# ------------------------------------------------------------------ Learning-to-Cache
def l2c_refresh(target: float) -> int:
    """The refresh period for a target: alternation (the paper's) where it can reach the
    target (its floor is about 0.5 + the modulation), else a full step every 3."""
    return 2 if target >= 0.55 else 3


def l2c_rows(bench, target: float, refresh: int, log, kind: str = "l2c", settings: dict | None = None) -> list:
    """L2C and L2C with OmniCache's γ at ``target`` (threshold calibrated to it), or at the
    router's own threshold with ``settings=dict(compute_fraction=None)``."""
    out = []
    for method, correction in (("L2C", False), ("L2C + OmniCache γ", True)):
        fields = dict(dict(compute_fraction=target, refresh=refresh, correction=correction), **(settings or {}))
        config = L2CConfig(**fields)
        t0 = time.perf_counter()
        plan = bench.resolve(config)
        seconds = time.perf_counter() - t0
        row = row_of(bench, method, target, config, kind=kind, train_s=plan.meta["train_seconds"],
                     calibrate_s=round(seconds, 1), removed_in_cache_steps=plan.meta["removed_in_cache_steps"],
                     removed_overall=plan.meta["removed_overall"], threshold=plan.meta["threshold"])
        row["policy"] = f"l2c(refresh={refresh},thr={plan.meta['threshold']:.3g}{',γ' if correction else ''})"
        out.append(row)
        log(f"[{bench.sampler} {target}] {method}: {row['compute_fraction']:.3f} {row['psnr']:.2f} dB, "
            f"{row['removed_in_cache_steps'] * 100:.1f}% of cache-step branches removed ({seconds:.0f} s)")
    return out


def l2c_native_rows(bench, tune_ref, tune_labels, log) -> list:
    """L2C at its own operating point (default router, threshold 0.5) and, at that compute
    fraction, FORA, TaylorSeer order 2 (tuned like every static baseline) and OmniCache."""
    config = L2CConfig()
    plan = bench.resolve(config)
    fraction = plan.compute_fraction(bench.model.flops_per_sample())
    rows = l2c_rows(bench, fraction, config.refresh, log, kind="l2c-native", settings=dict(compute_fraction=None))
    for r in rows:
        r["method"] += " (threshold 0.5)"
    for name in ("fora", "taylorseer-o2"):
        cfg, tried = tune_static(bench, tune_ref, tune_labels, name, fraction)
        rows.append(row_of(bench, name, fraction, cfg, kind="l2c-native", tried=tried))
    omni = OmniCacheConfig(compute_fraction=fraction)
    rows.append(row_of(bench, "OmniCache + correction", fraction, omni, kind="l2c-native"))
    rows[-1]["policy"] = f"omnicache(compute_fraction={fraction:.3f})"
    for r in rows[2:]:
        log(f"[{bench.sampler} L2C point {fraction:.3f}] {r['policy']}: {r['compute_fraction']:.3f} {r['psnr']:.2f} dB")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=64, help="evaluation samples (default 64)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    parser.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    parser.add_argument("--no-ablation", action="store_true", help="skip the extra OmniCache ablation rows")
    parser.add_argument("--no-l2c", action="store_true", help="skip the Learning-to-Cache rows")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 samples, 12 steps, target 0.5")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"),
                        help="folder for omnicache-comparison.{json,md,png}")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.steps, args.targets, args.no_ablation = 8, 12, [0.5], True
    torch.set_num_threads(1)
    start = time.perf_counter()

    def log(msg):
        print(f"{time.perf_counter() - start:7.0f}s  {msg}", file=sys.stderr, flush=True)

    model, classifier = load_default(), load_classifier()
    rows_by_sampler = {s: run_sampler(model, classifier, s, args, log) for s in args.samplers}
    total_s = time.perf_counter() - start

    summary, paragraph = verdicts(rows_by_sampler, TARGETS)
    l2c_summary, l2c_paragraph = l2c_verdicts(rows_by_sampler)
    ablation = ablation_summary(rows_by_sampler, ABLATION_TARGETS)
    side = model.config.input_size // model.config.patch_size
    why = explanation(rows_by_sampler, summary, (side, side), ABLATION_TARGETS)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "omnicache-comparison" + ("-quick" if args.quick else "")
    meta = dict(model="embedded default (omnicache/data/default_model.json)", device=f"cpu: {cpu_name()}",
                threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="python benchmarks/compare.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                samples=args.samples, steps=args.steps, noise_seed=0, guidance=model.default_guidance,
                targets=args.targets, tolerance=TOLERANCE, tuning_batch=dict(samples=TUNE_SAMPLES, seed=TUNE_SEED),
                omnicache_calibration=dict(samples=OmniCacheConfig.calibration_samples,
                                           seed=OmniCacheConfig.calibration_seed),
                total_wall_s=round(total_s, 1))
    result = dict(meta, summary=summary, l2c_summary=l2c_summary, results={s: [public_row(r) for r in rows]
                                                  for s, rows in rows_by_sampler.items()})
    atomic_write_text(out / f"{stem}.json", json.dumps(result, indent=1) + "\n")
    pareto_plot(rows_by_sampler, out / f"{stem}.png")

    md = ["# OmniCache vs baselines at equal compute\n",
          f"Embedded default DiT (digits), {args.steps} steps, guidance {model.default_guidance:g}, "
          f"{args.samples} samples (classes in turn, noise seed 0), {meta['device']}, 1 thread, "
          f"torch {torch.__version__}, {meta['date']}. PSNR/SSIM against uncached sampling with the same "
          f"noise; class accuracy of the project's digit classifier; speedup = uncached wall / cached wall "
          f"in the same run; ideal = 1 / compute fraction. Command: `{meta['command']}` "
          f"({total_s / 60:.1f} min).\n"]
    for sampler, rows in rows_by_sampler.items():
        main_rows = [r for r in rows if not r["method"].startswith("ablation") and r["kind"] != "l2c-native"]
        md.append(f"## {sampler}\n\n{markdown_table(main_rows)}\n")
        abl = [r for r in rows if r["method"].startswith("ablation")]
        if abl:
            md.append(f"Ablation ({sampler}):\n\n{markdown_table(abl)}\n")
    md.append("## Where OmniCache wins or loses, and why\n")
    md.append(paragraph + "\n")
    md.append(why + "\n")
    if ablation:
        md.append("What each part adds at equal compute (PSNR of OmniCache + correction minus the row "
                  "without that part; filtering: with minus without):\n\n" + ablation + "\n")
    if l2c_summary:
        md.append("## Learning-to-Cache at its own operating point\n")
        md.append("Router: the default `L2CConfig()` (refresh every 2 steps, λ = 1e-4, 100 AdamW iterations "
                  "on 64 self-generated trajectories, threshold 0.5); FORA and TaylorSeer tuned to its compute "
                  "fraction as above.\n")
        for sampler, rows in rows_by_sampler.items():
            native = [r for r in rows if r["kind"] == "l2c-native"]
            if native:
                md.append(f"{sampler}:\n\n{markdown_table(native)}\n")
        md.append(l2c_paragraph + "\n")
    atomic_write_text(out / f"{stem}.md", "\n".join(md))

    for sampler, rows in rows_by_sampler.items():
        print(f"\n== {sampler}, {args.steps} steps, {args.samples} samples")
        uncached = [r for r in rows if r["method"] == "uncached"]
        for target in args.targets:
            at = [r for r in rows if r["target"] == target]
            if at:
                print(f"-- target compute fraction {target}")
                print(format_table(uncached + at))
    print("\n" + paragraph + "\n\n" + why + ("\n\n" + l2c_paragraph if l2c_paragraph else ""))
    if ablation:
        print(ablation)
    print(f"\nwrote {out / stem}.json, .md, .png ({total_s / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
