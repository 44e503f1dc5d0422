"""The ``omnicache`` command.

    omnicache demo [--out DIR]                 the main job: every policy vs uncached, on the embedded model
    omnicache eval --policy NAME [...]         measure chosen policies the same way, to JSON
    omnicache calibrate --policy omnicache --compute-fraction F --out plan.json
    omnicache train-router [--steps N --sampler S --lambda L --target-compute F --iters I --seed K] --out plan.json
    omnicache train-default [...] | train-arena {flux,latte} [...]    train the embedded model | a diffusers arena

:mod:`.run` holds demo and eval, :mod:`.plans` calibrate and train-router, :mod:`.train`
train-default and train-arena, :mod:`.checks` the argument checks they share.
"""

from __future__ import annotations

import argparse
import sys

from .checks import OneLineParser
from .plans import cmd_calibrate, cmd_train_router
from .run import add_run_args, cmd_demo, cmd_eval
from .train import cmd_train_arena, cmd_train_default

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from ..evaluate import POLICIES

    parser = OneLineParser(prog="omnicache", description="Feature caching for Diffusion Transformers.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    demo = sub.add_parser("demo", help="every policy at its default vs uncached, on the embedded model")
    add_run_args(demo)
    demo.add_argument("--out", default="out/demo", help="folder for samples.png and demo.json (default out/demo)")
    ev = sub.add_parser("eval", help="measure chosen policies against uncached sampling")
    add_run_args(ev)
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


# the commands that parse their own arguments (argv after the command's name)
ARGV_COMMANDS = {"calibrate": cmd_calibrate, "train-router": cmd_train_router,
                 "train-default": cmd_train_default, "train-arena": cmd_train_arena}


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
