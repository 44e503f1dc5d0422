"""``omnicache calibrate`` and ``omnicache train-router``: compute a cache plan on the
embedded default model (OmniCache's calibration, Learning-to-Cache's router) and write it
(JSON). Each parses its own arguments and returns its exit status."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from ..runtime.engine import calibrate
from .checks import OneLineParser, check_device, check_number, check_out_file, check_seed


def _calibrate_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="omnicache calibrate",
                description="Calibrate OmniCache on the embedded default model and write its CachePlan (JSON).")
    p.add_argument("--policy", required=True, choices=["omnicache"], help="the policy to calibrate")
    p.add_argument("--compute-fraction", type=float, required=True, help="share of the steps to compute, in (0, 1]")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--sampler", default="flow", choices=["flow", "ddim"], help="default flow")
    p.add_argument("--samples", type=int, default=None, help="calibration samples, classes in turn (default 20)")
    p.add_argument("--seed", type=int, default=None, help="calibration noise seed (default 1234)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an OmniCacheConfig field, e.g. order=1 or selection=curvature (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--out", required=True, help="where to write the plan (JSON)")
    return p


def _config_from_args(args):
    """The :class:`OmniCacheConfig` of the command line (``--set`` values typed by the field)."""
    from ..policies import OmniCacheConfig

    fields = {f.name: f for f in dataclasses.fields(OmniCacheConfig)}
    kwargs = {"compute_fraction": args.compute_fraction}
    if args.samples is not None:
        kwargs["calibration_samples"] = args.samples
    if args.seed is not None:
        kwargs["calibration_seed"] = args.seed
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item}: expected key=value")
        if key not in fields or key in ("compute_fraction", "plan_path"):
            names = ", ".join(n for n in fields if n not in ("compute_fraction", "plan_path"))
            raise ValueError(f"--set {key}: not a settable OmniCacheConfig field (fields: {names})")
        default = fields[key].default
        if isinstance(default, bool):
            if text.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(f"--set {key}={text}: expected true or false")
            kwargs[key] = text.lower() in ("1", "true", "yes", "on")
        elif isinstance(default, (int, float)):
            try:
                kwargs[key] = type(default)(text)
            except ValueError:
                raise ValueError(f"--set {key}={text}: expected {type(default).__name__}") from None
        else:
            kwargs[key] = text
    return OmniCacheConfig(**kwargs)


def cmd_calibrate(argv) -> int:
    """``omnicache calibrate``: calibrate OmniCache on the embedded default model, write the plan.

    Returns 0 on success; bad arguments print one line on stderr and return (or exit) 2.
    """
    try:
        args = _calibrate_parser().parse_args(argv)
    except SystemExit as stop:  # argparse has printed its one line (or --help)
        return stop.code if isinstance(stop.code, int) else 2
    try:
        if not 0.0 < args.compute_fraction <= 1.0:
            raise ValueError(f"--compute-fraction must be in (0, 1], got {args.compute_fraction}")
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        check_out_file("--out", args.out)
        check_number("--guidance", args.guidance)
        check_seed("--seed", args.seed)
        check_device(args.device)
        config = _config_from_args(args)
        from ..runtime.default import load_default

        model = load_default(device=args.device)
        guidance = args.guidance if args.guidance is not None else getattr(model, "default_guidance", 1.0)
        plan = calibrate(config, model, steps=args.steps, sampler=args.sampler, guidance=guidance, progress=True)
        plan.save(args.out)
    except (ValueError, RuntimeError, OSError) as err:
        print(f"omnicache calibrate: error: {err}", file=sys.stderr)
        return 2
    computed = sum(row[0][0] for row in plan.compute)
    fraction = plan.compute_fraction(model.flops_per_sample())
    print(f"wrote {args.out}: {computed}/{plan.steps} steps computed, compute fraction {fraction:.3f}, "
          f"{args.sampler} sampler, guidance {guidance:g}")
    return 0


def _train_router_parser() -> argparse.ArgumentParser:
    from ..policies import L2CConfig

    d = L2CConfig()
    p = OneLineParser(prog="omnicache train-router",
                description="Learning-to-Cache: train a router on the embedded default model (frozen) and "
                            "write the thresholded branch-level CachePlan (JSON).")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--sampler", default="flow", choices=["flow", "ddim"], help="default flow")
    p.add_argument("--lambda", dest="lam", type=float, default=d.lam, help=f"weight of Σβ (default {d.lam:g})")
    p.add_argument("--target-compute", type=float, default=None,
                   help="calibrate the threshold to this compute fraction (default: threshold 0.5)")
    p.add_argument("--threshold", type=float, default=d.threshold, help="β threshold (default 0.5)")
    p.add_argument("--refresh", type=int, default=d.refresh, help=f"a full step every N steps (default {d.refresh})")
    p.add_argument("--iters", type=int, default=d.iters, help=f"AdamW iterations (default {d.iters})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"learning rate (default {d.lr:g})")
    p.add_argument("--batch", type=int, default=d.batch, help=f"samples per iteration (default {d.batch})")
    p.add_argument("--train-samples", type=int, default=d.train_samples,
                   help=f"trajectories to train on (default {d.train_samples})")
    p.add_argument("--data", default=d.data, choices=["self", "digits"],
                   help="self-generated trajectories (default) or the digits data set")
    p.add_argument("--seed", type=int, default=d.seed, help="seed (default 0)")
    p.add_argument("--correction", action="store_true", help="also fit OmniCache's γ correction on the plan")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--out", required=True, help="where to write the plan (JSON)")
    return p


def cmd_train_router(argv) -> int:
    """``omnicache train-router``; returns 0, or 2 with one line on stderr for bad arguments."""
    try:
        args = _train_router_parser().parse_args(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 2
    try:
        from ..policies import L2CConfig
        from ..runtime.default import load_default

        if args.steps < 2:
            raise ValueError(f"--steps must be >= 2, got {args.steps}")
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        check_out_file("--out", args.out)
        check_number("--guidance", args.guidance)
        check_seed("--seed", args.seed)
        check_device(args.device)
        config = L2CConfig(compute_fraction=args.target_compute, threshold=args.threshold, refresh=args.refresh,
                           lam=args.lam, iters=args.iters, lr=args.lr, batch=args.batch,
                           train_samples=args.train_samples, data=args.data, seed=args.seed,
                           correction=args.correction)
        model = load_default(device=args.device)
        guidance = args.guidance if args.guidance is not None else getattr(model, "default_guidance", 1.0)
        t0 = time.perf_counter()
        plan = calibrate(config, model, steps=args.steps, sampler=args.sampler, guidance=guidance, progress=True)
        seconds = time.perf_counter() - t0
        plan.save(args.out)
    except (ValueError, RuntimeError, OSError) as err:
        print(f"omnicache train-router: error: {err}", file=sys.stderr)
        return 2
    m = plan.meta
    print(f"wrote {args.out}: {m['removed_in_cache_steps'] * 100:.1f}% of branches removed in cache steps "
          f"({m['removed_overall'] * 100:.1f}% overall), compute fraction "
          f"{plan.compute_fraction(model.flops_per_sample()):.3f}, threshold {m['threshold']:.3f}, "
          f"final loss {m['final_loss']:.4g}, {seconds:.0f} s")
    return 0
