"""The ``omnicache`` command.

    omnicache demo [--out DIR]                 the main job: every policy vs uncached, on the embedded model
    omnicache eval --policy NAME [...]         measure chosen policies the same way, to JSON
    omnicache calibrate --policy omnicache --compute-fraction F --out plan.json
    omnicache train-router [--steps N --sampler S --lambda L --target-compute F --iters I --seed K] --out plan.json
    omnicache train-default [...]              train the embedded default model and classifier
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr, exit status 2, no usage dump or traceback."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _bench(args, labels):
    from .evaluate import Bench
    from .runtime.default import load_classifier, load_default

    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
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


def _save_grid(rows: list[dict], path: pathlib.Path, columns: int = 10) -> None:
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write(out: pathlib.Path | None, rows: list[dict], bench, args) -> None:
    from .evaluate import public_row

    if out is None:
        return
    result = dict(model="embedded default (omnicache/data/default_model.json)", device=str(args.device),
                  torch=torch.__version__, steps=args.steps, sampler=args.sampler, samples=len(bench.labels),
                  seed=args.seed, guidance=bench.guidance, command="omnicache " + " ".join(sys.argv[1:]),
                  results=[public_row(r) for r in rows])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


def _l2c_plans(bench, args) -> list:
    """Learning-to-Cache for the demo: the plan shipped for the embedded model when it fits
    this run (else a router trained now), as is (with OmniCache's γ) and without γ (the
    paper's L2C)."""
    import dataclasses

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

    bench = _bench(args, _labels(args.samples))
    rows = [dict(bench.uncached_row(), samples=bench.reference.samples)]
    names = [n for n in POLICIES if n != "nocache"]
    with tqdm(names, desc="policies", unit="policy", file=sys.stderr) as bar:
        for name in bar:
            bar.set_postfix_str(name)
            config = make_config(name)
            if name == "teacache":  # its polynomial is fitted on this model, not on the eval batch
                import dataclasses

                config = dataclasses.replace(config, coefficients=bench.fit_teacache())
            if name == "l2c":
                rows.extend(bench.measure(plan) for plan in _l2c_plans(bench, args))
                continue
            rows.append(bench.measure(config))
    print(format_table(rows))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _save_grid(rows, out / "samples.png")
    _write(out / "demo.json", rows, bench, args)
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

    bench = _bench(args, _labels(args.samples))
    rows = [bench.uncached_row()]
    for name in tqdm(args.policy, desc="policies", unit="policy", file=sys.stderr):
        sets = list(args.set)
        if name == "teacache" and not any(s.startswith("coefficients=") for s in sets):
            sets.append("coefficients=" + ",".join(repr(c) for c in bench.fit_teacache()))
        if args.compute_fraction is not None:
            config = tune_to_fraction(bench, name, args.compute_fraction, sets)
        else:
            config = make_config(name, sets)
        rows.append(bench.measure(config))
    print(format_table(rows))
    _write(pathlib.Path(args.json) if args.json else None, rows, bench, args)
    return 0


def cmd_train_default(args, rest) -> int:
    from . import train_default

    return train_default.main(rest) or 0


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
    sub.add_parser("calibrate", help="calibrate an OmniCache plan on the embedded model (see --help)",
                   add_help=False)
    sub.add_parser("train-router", help="Learning-to-Cache: train a router, write its plan (see --help)",
                   add_help=False)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["train-default"]:
        return cmd_train_default(None, argv[1:])
    if argv[:1] == ["calibrate"]:
        from . import calibrate

        return calibrate.main(argv[1:])
    if argv[:1] == ["train-router"]:
        from . import l2c

        return l2c.main(argv[1:])
    args = parser.parse_args(argv)
    try:
        return {"demo": cmd_demo, "eval": cmd_eval}[args.command](args)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"omnicache {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
