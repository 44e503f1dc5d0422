"""``omnicache demo`` and ``omnicache eval``: sample the embedded default model with
caching policies, measure them against uncached sampling, print the table, write the
results (JSON; the demo also its sample grid)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from ..io import atomic_path, atomic_write_text
from ..runtime.engine import calibrate
from .checks import check_device, check_number, check_out_file, check_out_folder, check_seed


def add_run_args(p) -> None:
    """The options demo and eval share."""
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


def _check_run_args(args) -> None:
    """The checks every sampling command shares (demo, eval)."""
    check_device(args.device)
    check_number("--guidance", args.guidance)
    check_seed("--seed", args.seed)
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")


def _bench(args, labels):
    from ..evaluate import Bench
    from ..runtime.default import load_classifier, load_default

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
    from ..evaluate import public_row

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

    from ..plan import CachePlan
    from ..policies import L2CConfig
    from ..runtime.default import default_l2c_plan

    path = default_l2c_plan(args.sampler, args.steps)
    model = bench.model
    if path is not None and bench.guidance in (None, getattr(model, "default_guidance", None)):
        plan = CachePlan.load(path)
    else:
        guidance = bench.guidance if bench.guidance is not None else getattr(model, "default_guidance", 1.0)
        plan = calibrate(L2CConfig(correction=True), model, steps=args.steps, sampler=args.sampler,
                         guidance=guidance, progress=True)
    share = plan.meta["removed_in_cache_steps"]
    plain = dataclasses.replace(plan, gamma=None, gamma2=None,
                                meta=dict(plan.meta, policy=f"l2c(removed={share:.0%})"))
    return [plain, dataclasses.replace(plan, meta=dict(plan.meta, policy=f"l2c+gamma(removed={share:.0%})"))]


def cmd_demo(args) -> int:
    from tqdm import tqdm

    from ..evaluate import POLICIES, format_table, make_config

    _check_run_args(args)
    labels = _labels(args.samples)
    check_out_folder("--out", args.out, files=("samples.png", "demo.json"))
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

    from ..evaluate import KNOBS, format_table, make_config, tune_to_fraction

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
        check_out_file("--json", args.json, create_parents=True)
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
    from ..evaluate import make_config
    from ..runtime.default import default_info, dit_config

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

