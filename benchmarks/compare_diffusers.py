"""OmniCache against the other caching systems on a trained diffusers FluxPipeline.

    OMP_NUM_THREADS=1 python benchmarks/compare_diffusers.py              # the full comparison
    python benchmarks/compare_diffusers.py --quick                         # smoke run (seconds)
    python benchmarks/compare_diffusers.py --steps 28 --samples 64 ...     # see --help

The arena: ``omnicache.arena.load_digits_pipeline("flux")``: a class-conditional
``FluxTransformer2DModel`` trained on scikit-learn's digits, driven by the unmodified
``diffusers.FluxPipeline`` (true CFG: two transformer calls per step, under the pipeline's
``cache_context("cond")`` / ``("uncond")``). Every system runs on its own deep copy of the
same pipeline, with the same inputs (labels = classes in turn, one ``torch.Generator`` seeded
``--seed``).

Systems (rows):

- ours (``omnicache.integrations.diffusers`` as ``oc``): FORA, TaylorSeer, FirstBlockCache,
  TeaCache (polynomial from ``oc.calibrate(pipe, TeaCacheConfig())`` on the calibration
  batch), MagCache (ratios from ``oc.calibrate(pipe, MagCacheConfig())`` on the calibration
  batch: a static plan), OmniCache (``oc.calibrate`` on the calibration batch),
  Learning-to-Cache (the router from ``oc.calibrate(pipe, L2CConfig(...))`` on the
  calibration batch), L2C + γ (that router's plan at each target, with OmniCache's
  closed-loop γ fitted by ``omnicache.fit_correction`` on the calibration batch, through
  ``oc.DiffusersEngine``).
- diffusers' own hooks (``pipe.transformer.enable_cache``): FirstBlockCache, TaylorSeer
  (standard and lite), MagCache (ratios from its own ``calibrate=True`` run on the
  calibration batch), PyramidAttentionBroadcast, FasterCache. A hook that fails on Flux is
  reported with its error.
- cache-dit (optional, ``pip install .[peers]`` or ``tools/install_peers.sh``): DBCache
  F1B0 and F1B1, DBCache F1B0 + TaylorSeer calibrator (order 1). Skipped, and said so,
  when not installed.

The calibration batch: other labels (classes shifted by 5) and another seed
(``--calib-seed``) than the evaluation batch.

Tuning (the same search for every system): each system's knob is set so that its compute
fraction on the *tuning batch* (the first ``--tune-samples`` samples of the evaluation
inputs) lands within ±0.03 of each target; integer knobs are scanned upward (stopping once
below the target band), float knobs bisected (at most ``--bisect`` evaluations, stopping
within ±0.01; a threshold's ``hi`` is only the first bracket, widened 4x up to four times while
the fraction stays above the target; a knob marked bounded, such as ToCa's reused share R,
never leaves its range), every evaluated point memoised per system so later targets start from a
bracket. A system that cannot reach a target reports the nearest point it reaches. OmniCache
and L2C take the target itself as their knob (their plans are cut to a FLOP fraction, in
whole steps); where that lands outside ±0.03 (OmniCache rounds its computed steps up), the
knob one step lower (or higher) is tried as well and the nearer kept. The search is
``omnicache.tuning.nearest_setting`` (ties go to the lower knob).

Measurements:

- compute fraction: linear FLOPs spent ÷ uncached, counted by *our own* forward hooks on
  every ``nn.Linear`` of the transformer (2·in·out·rows), the same for every system;
- wall time: ``--rounds`` interleaved rounds over all rows (every row once per round,
  the uncached row included), median per row; speedup = uncached median ÷ row median;
- PSNR / SSIM of the images against the uncached run, class accuracy of the project's
  digit classifier (images in [-1, 1]);
- host syncs per step: calls of ``Tensor.item / tolist / __bool__ / __float__ / __int__ /
  nonzero`` during the pipeline call (counted by ``omnicache.runtime.syncguard.count_host_syncs``;
  on a CPU build there is no ``cuda.synchronize``), divided by the steps; the uncached row
  gives the pipeline's own (its TorchFunctionMode costs a Python call per torch op in round
  0: about 2% of a 64-sample call on this arena, about 20% of a ``--quick`` 4-sample one);
- torch.compile: ``torch.compile(pipe.transformer, fullgraph=True, backend=...)`` on a short
  run (1 sample, 4 steps for dynamic systems, the full steps for plans; ``--compile-backend``
  default ``eager``: dynamo's full-graph capture without inductor code generation);
  ``ok`` or the error's first line.

Writes ``benchmarks/results/diffusers-comparison.{md,json,png}`` (``--out`` to change).

The pieces, by job: ``compare_diffusers_systems.py`` (the rows: installers, knobs,
calibrations), ``compare_diffusers_runs.py`` (one measured call, the knob search with
``omnicache.tuning``, the cached-step cost, the compile check), ``compare_diffusers_report.py``
(tables, targets, plot, files, merge); this file runs the comparison.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import math
import pathlib
import platform
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from compare_diffusers_report import format_table, merge, targets_check, write  # noqa: E402
from compare_diffusers_runs import (SYNC_METHODS, TOLERANCE, Tuner, build, cached_step_cost,  # noqa: E402
                                    compile_check, first_line, log, run_once, score_images)
from compare_diffusers_systems import Ctx, System, cache_dit_version, systems  # noqa: E402,F401 (System: for callers)

TARGETS = (0.6, 0.5, 0.4)
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def compare(args, systems_fn=None, score=score_images, arena="flux"):
    """The comparison on the ``arena`` pipeline: ``systems_fn(l2c_iters)`` the rows,
    ``score(images, ref_images, labels, classifier)`` their quality columns (shared with
    ``benchmarks/compare_video.py``)."""
    from omnicache.arena import load_digits_pipeline
    from omnicache.runtime.default import load_classifier

    torch.set_num_threads(args.threads)
    classifier = load_classifier()
    base = load_digits_pipeline(arena)
    num_classes = base.omnicache_arena.num_classes
    have_cachedit = cache_dit_version() is not None
    all_systems = [s for s in (systems_fn or systems)(args.l2c_iters) if not args.only or s.family == "uncached"
                   or any(o.lower() in s.name.lower() for o in args.only)]
    skipped = []
    if not have_cachedit:
        skipped += [dict(system=s.name, reason="cache-dit not installed (pip install .[peers] / tools/install_peers.sh)")
                    for s in all_systems if s.family == "cache-dit"]
        all_systems = [s for s in all_systems if s.family != "cache-dit"]
    report = dict(targets=list(args.targets), tolerance=TOLERANCE, per_steps={}, skipped=skipped)
    t_start = time.perf_counter()
    for steps in args.steps:
        t_steps = time.perf_counter()
        ctx = Ctx(base=base, steps=steps, eval_labels=[i % num_classes for i in range(args.samples)], seed=args.seed,
                  calib_labels=[(i + 5) % num_classes for i in range(args.calib_samples)], calib_seed=args.calib_seed,
                  tune_samples=min(args.tune_samples, args.samples))
        labels_t = torch.tensor(ctx.eval_labels)
        log(f"== {steps} steps: uncached reference ({args.samples} samples)")
        ref_pipe = copy.deepcopy(base)
        ref = run_once(ref_pipe, ctx, ctx.eval_labels, ctx.seed)
        ref_tune = run_once(copy.deepcopy(base), ctx, ctx.eval_labels[:ctx.tune_samples], ctx.seed)
        ref_acc = score(ref.images, ref.images, labels_t, classifier)["class_acc"]
        rows, errors, tunings = [], [], {}
        pipes = [("uncached", None, None, ref_pipe)]
        for s in all_systems:
            if s.family == "uncached":
                continue
            if s.install is None:
                errors.append(dict(system=s.name, error=s.note))
                continue
            t0 = time.perf_counter()
            try:
                if s.prepare is not None:
                    s.prepare(ctx)
                if s.knob is None:  # a fixed setting (a paper's operating point): one row, no target
                    pipes.append((s.name, None, None, build(s, ctx, None, None)))
                    log(f"   {s.name}: fixed setting")
                    continue
                tuner = Tuner(s, ctx, ref_tune.flops, args.bisect)
                seen = set()
                for target in args.targets:
                    knob = tuner.tune(target)
                    key = knob
                    if key in seen and s.knob[1] != "target":
                        # the same setting serves two targets (e.g. an interval): measured once, listed for both
                        pipes.append((s.name, target, knob, None))
                        continue
                    seen.add(key)
                    pipes.append((s.name, target, knob, build(s, ctx, knob, target)))
                tunings[s.name] = dict(knob=s.knob[0], memo={repr(k): v for k, v in sorted(tuner.memo.items())},
                                       seconds=round(time.perf_counter() - t0, 1))
                log(f"   {s.name}: tuned in {time.perf_counter() - t0:.0f}s "
                    f"({len(tuner.memo)} tuning runs) -> {[p[2] for p in pipes if p[0] == s.name]}")
            except Exception as e:
                errors.append(dict(system=s.name, error=first_line(e), traceback=traceback.format_exc()[-2000:]))
                pipes = [p for p in pipes if p[0] != s.name]
                log(f"   {s.name}: ERROR {first_line(e)}")
        # interleaved rounds: every row once per round; round 0 also measures FLOPs, syncs, images
        measured = {}
        walls = {i: [] for i in range(len(pipes))}
        for rnd in range(args.rounds):
            for i, (name, target, knob, pipe) in enumerate(pipes):
                if pipe is None:
                    continue
                try:
                    r = run_once(pipe, ctx, ctx.eval_labels, ctx.seed, count=(rnd == 0))
                except Exception as e:
                    errors.append(dict(system=name, error=f"at target {target}: {first_line(e)}"))
                    pipes[i] = (name, target, knob, None)
                    continue
                walls[i].append(r.wall)
                if rnd == 0:
                    measured[i] = r
                elif not torch.equal(r.images, measured[i].images):
                    measured[i].__dict__.setdefault("unrepeatable", True)
            log(f"   round {rnd + 1}/{args.rounds} done")
        ref_wall = statistics.median(walls[0])
        last = {}
        for i, (name, target, knob, pipe) in enumerate(pipes):
            if pipe is None:
                if (name, "measured") in last:
                    j = last[(name, "measured")][knob] if knob in last[(name, "measured")] else None
                    if j is not None:
                        shared = dict(rows[j], target=target, shared_with=rows[j]["target"])
                        shared["in_band"] = abs(shared["compute_fraction"] - target) <= TOLERANCE
                        rows.append(shared)
                continue
            r = measured[i]
            wall = statistics.median(walls[i])
            row = dict(system=name, family=name.split(":")[0], target=target, knob=knob,
                       compute_fraction=r.flops / ref.flops, flops_per_sample=r.flops / len(ctx.eval_labels),
                       wall_s=wall, walls=walls[i], speedup=ref_wall / wall, ideal_speedup=ref.flops / r.flops,
                       **score(r.images, ref.images, labels_t, classifier),
                       syncs_per_step=r.syncs / steps, repeatable=not getattr(r, "unrepeatable", False))
            if name == "uncached":
                row["psnr"] = math.inf
            row["in_band"] = target is None or abs(row["compute_fraction"] - target) <= TOLERANCE
            last.setdefault((name, "measured"), {})[knob] = len(rows)
            rows.append(row)
        report["per_steps"][str(steps)] = dict(
            steps=steps, samples=args.samples, rows=rows, errors=errors, tunings=tunings, reference_acc=ref_acc,
            reference_flops=ref.flops, reference_wall_s=ref_wall, seconds=round(time.perf_counter() - t_steps, 1),
            prepared={k: v for k, v in ctx.prepared.items() if k in ("mag_ratios_all",)},
            teacache=dataclasses.asdict(ctx.prepared["teacache"]) if "teacache" in ctx.prepared else None)
        if args.cost_rounds > 0:
            report["per_steps"][str(steps)]["cached_step_cost"] = cached_step_cost(ctx, args.cost_rounds)
        if args.compile:
            comp = {}
            for s in all_systems:
                if s.install is None or any(e["system"] == s.name for e in errors):
                    continue
                knob = next((r["knob"] for r in rows if r["system"] == s.name and r["target"] in (0.5, None)),
                            next((r["knob"] for r in rows if r["system"] == s.name), None))
                short = steps if s.knob and s.knob[1] == "target" else args.compile_steps
                t0 = time.perf_counter()
                comp[s.name] = compile_check(s, ctx, knob, 0.5, args.compile_backend, short)
                log(f"   compile {s.name}: {comp[s.name]} ({time.perf_counter() - t0:.0f}s)")
            report["per_steps"][str(steps)]["compile"] = comp
        print(format_table(report["per_steps"][str(steps)]), flush=True)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    return report


def add_arguments(p, steps, samples, tune_samples, targets, out):
    """The options compare_diffusers.py and compare_video.py share, with their defaults."""
    p.add_argument("--steps", type=int, nargs="+", default=steps)
    p.add_argument("--samples", type=int, default=samples)
    p.add_argument("--tune-samples", type=int, default=tune_samples)
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-seed", type=int, default=1234)
    p.add_argument("--targets", type=float, nargs="+", default=list(targets))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bisect", type=int, default=8)
    p.add_argument("--l2c-iters", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", nargs="*", help="only systems whose name contains one of these")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile-backend", default="eager")
    p.add_argument("--compile-steps", type=int, default=4)
    p.add_argument("--out", default=None, help=f"output stem (default benchmarks/results/{out})")
    p.add_argument("--no-write", action="store_true")


def record_run(report, args, script, argv, **versions):
    """The run's command, date, device, versions and settings, into ``report``."""
    import diffusers
    report.update(
        command=f"python benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=dict(kind="cpu", processor=platform.processor() or platform.machine(), threads=args.threads,
                    platform=platform.platform()),
        versions=dict(torch=torch.__version__, diffusers=diffusers.__version__, **versions,
                      python=platform.python_version()),
        settings=dict(samples=args.samples, tune_samples=args.tune_samples, calib_samples=args.calib_samples,
                      seed=args.seed, calib_seed=args.calib_seed, rounds=args.rounds, bisect=args.bisect,
                      l2c_iters=args.l2c_iters, compile_backend=args.compile_backend,
                      compile_steps=args.compile_steps, sync_methods=list(SYNC_METHODS)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 8 steps, 4 samples, target 0.5, 1 round")
    add_arguments(p, [28, 50], 64, 16, TARGETS, "diffusers-comparison")
    p.add_argument("--cost-rounds", type=int, default=10)
    p.add_argument("--merge", nargs="+", help="merge these JSON reports into --out and exit")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, pathlib.Path(args.out) if args.out else RESULTS / "diffusers-comparison")
    if args.quick:
        args.steps, args.samples, args.tune_samples, args.calib_samples = [8], 4, 4, 2
        args.targets, args.rounds, args.bisect, args.l2c_iters, args.compile_steps, args.cost_rounds = [0.5], 1, 3, 2, 2, 1
    report = compare(args)
    record_run(report, args, "compare_diffusers.py", argv, cache_dit=cache_dit_version())
    for block in report["per_steps"].values():
        block["targets_check"] = targets_check(block)
    for s in report["skipped"]:
        print(f"skipped: {s['system']}: {s['reason']}")
    if not args.no_write:
        write(report, pathlib.Path(args.out) if args.out else RESULTS / "diffusers-comparison")
    return report


if __name__ == "__main__":
    main()
