"""The ``omnicache`` command.

    omnicache demo [--out DIR]                 the main job: every policy vs uncached, on the embedded model
    omnicache eval --policy NAME [...]         measure chosen policies the same way, to JSON
    omnicache calibrate --policy omnicache --compute-fraction F --out plan.json
    omnicache train-router [--steps N --sampler S --lambda L --target-compute F --iters I --seed K] --out plan.json
    omnicache train-default [...] | train-arena flux [...]    train the embedded model | the Flux digits arena
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from .io import atomic_path, atomic_write_text


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr, exit status 2, no usage dump or traceback."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


# ---------------------------------------------------------------- argument checks
# Everything a command will need at its end (the device, where it writes) is checked
# before its first slow step, so a bad argument costs nothing and touches no file.


def _check_device(text: str) -> None:
    """``--device``: a device this torch can allocate on (not ``meta``)."""
    from .api import _device

    try:
        _device(text)
    except ValueError as e:
        raise ValueError(f"--device {text}: {e}") from None


def _check_number(flag: str, value) -> None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{flag} {value}: must be a finite number")


def _check_seed(flag: str, value) -> None:
    if value is not None and not -2**63 <= value < 2**64:  # what torch's generators take
        raise ValueError(f"{flag} {value}: must be an int in [-2**63, 2**64)")


def _writable_folder(flag: str, text: str, folder: Path, create: bool) -> None:
    """``folder`` exists (or, with ``create``, its first existing ancestor is a folder we can
    write in, so it can be made)."""
    folder = Path(os.path.abspath(folder))
    if not create and not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ValueError(f"{flag} {text}: folder {folder} {what}")
    anc = folder
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise ValueError(f"{flag} {text}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {text}: folder {anc} is not writable")


def _check_out_file(flag: str, text: str, create_parents: bool = False) -> None:
    """``text`` is a file path the command can write at its end: not a folder, and in a
    folder that exists (or, with ``create_parents``, can be made) and is writable (the
    atomic write renames a new file into place there)."""
    path = Path(text)
    if path.is_dir():
        raise ValueError(f"{flag} {text}: is a folder, expected a file path")
    _writable_folder(flag, text, path.parent, create_parents)


def _check_out_folder(flag: str, text: str, files: tuple = ()) -> None:
    """``text`` is a folder (existing or creatable) where ``files`` can be written."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {text}: is a file, expected a folder")
    _writable_folder(flag, text, path, create=True)
    for name in files:
        if (path / name).is_dir():
            raise ValueError(f"{flag} {text}: {path / name} is a folder, expected a file path")


def _check_run_args(args) -> None:
    """The checks every sampling command shares (demo, eval)."""
    _check_device(args.device)
    _check_number("--guidance", args.guidance)
    _check_seed("--seed", args.seed)
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")


def _bench(args, labels):
    from .evaluate import Bench
    from .runtime.default import load_classifier, load_default

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = load_default(device=args.device)
    classifier = load_classifier(device=args.device)
    return Bench(model, classifier, labels.to(args.device), steps=args.steps, sampler=args.sampler,
                 seed=args.seed, guidance=args.guidance, repeats=args.repeats)


def _labels(samples: int) -> torch.Tensor:
    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    return torch.arange(samples) % 10


def _save_grid(rows: list[dict], path, columns: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), columns, figsize=(columns * 0.8, len(rows) * 0.9), squeeze=False)
    for r, row in enumerate(rows):
        images = row["samples"][:columns]
        for c in range(columns):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(images):
                ax.imshow(images[c, 0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        axes[r][0].set_title(row["policy"], fontsize=7, loc="left")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120, format="png")
    finally:
        plt.close(fig)


def _write(out: Path | None, rows: list[dict], bench, args) -> None:
    from .evaluate import public_row

    if out is None:
        return
    result = dict(model="embedded default (omnicache/data/default_model.json)", device=str(args.device),
                  torch=torch.__version__, steps=args.steps, sampler=args.sampler, samples=len(bench.labels),
                  seed=args.seed, guidance=bench.guidance, command="omnicache " + " ".join(sys.argv[1:]),
                  results=[public_row(r) for r in rows])
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")


def _write_demo(out: Path, rows: list[dict], bench, args) -> None:
    """``samples.png`` and ``demo.json`` in ``out``, both or neither: the image is drawn to a
    temporary file first and put in place only once the JSON is written (atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "samples.png") as png:
        _save_grid(rows, png)
        _write(out / "demo.json", rows, bench, args)


def _l2c_plans(bench, args) -> list:
    """Learning-to-Cache for the demo: the plan shipped for the embedded model when it fits
    this run (else a router trained now), as is (with OmniCache's γ) and without γ (the
    paper's L2C)."""

    from .plan import CachePlan
    from .policies import L2CConfig
    from .runtime.default import default_l2c_plan

    path = default_l2c_plan(args.sampler, args.steps)
    model = bench.model
    if path is not None and bench.guidance in (None, getattr(model, "default_guidance", None)):
        plan = CachePlan.load(path)
    else:
        guidance = bench.guidance if bench.guidance is not None else getattr(model, "default_guidance", 1.0)
        plan = L2CConfig(correction=True).calibrate(model, steps=args.steps, sampler=args.sampler,
                                                    guidance=guidance, progress=True)
    share = plan.meta["removed_in_cache_steps"]
    plain = dataclasses.replace(plan, gamma=None, gamma2=None,
                                meta=dict(plan.meta, policy=f"l2c(removed={share:.0%})"))
    return [plain, dataclasses.replace(plan, meta=dict(plan.meta, policy=f"l2c+gamma(removed={share:.0%})"))]


def cmd_demo(args) -> int:
    from tqdm import tqdm

    from .evaluate import POLICIES, format_table, make_config

    _check_run_args(args)
    labels = _labels(args.samples)
    _check_out_folder("--out", args.out, files=("samples.png", "demo.json"))
    bench = _bench(args, labels)
    rows = [dict(bench.uncached_row(), samples=bench.reference.samples)]
    names = [n for n in POLICIES if n != "nocache"]
    with tqdm(names, desc="policies", unit="policy", file=sys.stderr) as bar:
        for name in bar:
            bar.set_postfix_str(name)
            config = make_config(name)
            if name == "teacache":  # its polynomial is fitted on this model, not on the eval batch

                config = dataclasses.replace(config, coefficients=bench.fit_teacache())
            if name == "l2c":
                rows.extend(bench.measure(plan) for plan in _l2c_plans(bench, args))
                continue
            rows.append(bench.measure(config))
    print(format_table(rows))
    out = Path(args.out)
    _write_demo(out, rows, bench, args)
    print(f"wrote {out / 'samples.png'} and {out / 'demo.json'}")
    return 0


def cmd_eval(args) -> int:
    from tqdm import tqdm

    from .evaluate import KNOBS, format_table, make_config, tune_to_fraction

    # Every argument is checked before the first (slow) sampling run.
    for name in args.policy:
        make_config(name, args.set)
        if args.compute_fraction is not None and name not in KNOBS:
            raise ValueError(f"policy {name!r} has no compute knob; drop --compute-fraction")
    if args.compute_fraction is not None and not 0.0 < args.compute_fraction <= 1.0:
        raise ValueError(f"--compute-fraction must be in (0, 1], got {args.compute_fraction}")
    _check_run_args(args)
    labels = _labels(args.samples)
    if args.json:
        _check_out_file("--json", args.json, create_parents=True)
    saved = {name: _saved_plan(name, args) for name in args.policy}  # plan files: read and checked now

    bench = _bench(args, labels)
    rows = [bench.uncached_row()]
    for name in tqdm(args.policy, desc="policies", unit="policy", file=sys.stderr):
        if saved[name] is not None:
            rows.append(bench.measure(saved[name]))
            continue
        sets = list(args.set)
        if name == "teacache" and not any(s.startswith("coefficients=") for s in sets):
            sets.append("coefficients=" + ",".join(repr(c) for c in bench.fit_teacache()))
        if args.compute_fraction is not None:
            config = tune_to_fraction(bench, name, args.compute_fraction, sets)
        else:
            config = make_config(name, sets)
        rows.append(bench.measure(config))
    print(format_table(rows))
    _write(Path(args.json) if args.json else None, rows, bench, args)
    return 0


def _saved_plan(name: str, args):
    """The plan file a policy's ``--set plan_path=FILE`` names, loaded and checked against the
    run (steps, the embedded model's depth), labelled by what it holds; None without one."""
    from .evaluate import make_config
    from .runtime.default import default_info, dit_config

    config = make_config(name, args.set)
    path = getattr(config, "plan_path", None)
    if path is None:
        return None
    if args.compute_fraction is not None:
        raise ValueError(f"--set plan_path={path}: a saved plan has its own compute; drop --compute-fraction")
    try:
        plan = config.plan(args.steps, dit_config(default_info()).depth)
    except FileNotFoundError:
        raise ValueError(f"--set plan_path={path}: no such file") from None
    except (ValueError, OSError) as e:
        where = "--set plan_path" if str(path) in str(e) else f"--set plan_path={path}"  # name the file once
        raise ValueError(f"{where}: {e}") from None
    label = f"{plan.meta.get('policy', 'plan')}(plan={Path(path).name})"
    return dataclasses.replace(plan, meta=dict(plan.meta, policy=label))


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
    from .policies import OmniCacheConfig

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
        _check_out_file("--out", args.out)
        _check_number("--guidance", args.guidance)
        _check_seed("--seed", args.seed)
        _check_device(args.device)
        config = _config_from_args(args)
        from .runtime.default import load_default

        model = load_default(device=args.device)
        guidance = args.guidance if args.guidance is not None else getattr(model, "default_guidance", 1.0)
        plan = config.calibrate(model, steps=args.steps, sampler=args.sampler, guidance=guidance, progress=True)
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
    from .policies import L2CConfig

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
        from .policies import L2CConfig
        from .runtime.default import load_default

        if args.steps < 2:
            raise ValueError(f"--steps must be >= 2, got {args.steps}")
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        _check_out_file("--out", args.out)
        _check_number("--guidance", args.guidance)
        _check_seed("--seed", args.seed)
        _check_device(args.device)
        config = L2CConfig(compute_fraction=args.target_compute, threshold=args.threshold, refresh=args.refresh,
                           lam=args.lam, iters=args.iters, lr=args.lr, batch=args.batch,
                           train_samples=args.train_samples, data=args.data, seed=args.seed,
                           correction=args.correction)
        model = load_default(device=args.device)
        guidance = args.guidance if args.guidance is not None else getattr(model, "default_guidance", 1.0)
        t0 = time.perf_counter()
        plan = config.calibrate(model, steps=args.steps, sampler=args.sampler, guidance=guidance, progress=True)
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


def _add_run_args(p) -> None:
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--sampler", default="flow", choices=["flow", "ddim"], help="default flow")
    p.add_argument("--samples", type=int, default=32, help="images, classes 0-9 in turn (default 32)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per policy; the fastest counts")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    # The default model is tiny: intra-op threads gain little, and one thread keeps the
    # timings stable when other processes share the cores (no OpenMP spin-waits).
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")


def build_parser() -> argparse.ArgumentParser:
    from .evaluate import POLICIES

    parser = OneLineParser(prog="omnicache", description="Feature caching for Diffusion Transformers.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    demo = sub.add_parser("demo", help="every policy at its default vs uncached, on the embedded model")
    _add_run_args(demo)
    demo.add_argument("--out", default="out/demo", help="folder for samples.png and demo.json (default out/demo)")
    ev = sub.add_parser("eval", help="measure chosen policies against uncached sampling")
    _add_run_args(ev)
    ev.add_argument("--policy", action="append", required=True, choices=list(POLICIES),
                    help="a policy to measure (repeatable)")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config field for the policies (repeatable)")
    ev.add_argument("--compute-fraction", type=float, default=None,
                    help="tune each policy's knob to this compute fraction")
    ev.add_argument("--json", default=None, help="write the results here")
    sub.add_parser("train-default", help="train the embedded DiT and classifier (see --help)", add_help=False)
    sub.add_parser("train-arena", help="train a diffusers arena model, e.g. train-arena flux (see --help)",
                   add_help=False)
    sub.add_parser("calibrate", help="calibrate an OmniCache plan on the embedded model (see --help)",
                   add_help=False)
    sub.add_parser("train-router", help="Learning-to-Cache: train a router, write its plan (see --help)",
                   add_help=False)
    return parser


def _trainer(module: str):
    """A command that hands its arguments to a trainer's own ``main`` (imported when run)."""
    return lambda argv: importlib.import_module(module, __package__).main(argv) or 0


ARGV_COMMANDS = {"calibrate": cmd_calibrate, "train-router": cmd_train_router,  # they parse their own arguments
                 "train-default": _trainer(".train_default"), "train-arena": _trainer(".arena.train")}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in ARGV_COMMANDS:
        return ARGV_COMMANDS[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return {"demo": cmd_demo, "eval": cmd_eval}[args.command](args)
    except (ValueError, RuntimeError, OSError) as err:
        print(f"omnicache {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
