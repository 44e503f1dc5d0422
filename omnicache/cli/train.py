"""``omnicache train-default`` and ``omnicache train-arena NAME``: the trainers' options,
checked and handed as settings to :func:`omnicache.train_default.train` (the embedded DiT
and digit classifier) and :func:`omnicache.arena.train.train` (the diffusers arenas).
Each parses its own arguments; a bad one exits with status 2 and argparse's usage and
error lines."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
from pathlib import Path


def _in_flags(message: str, settings_type, positional=()) -> str:
    """A settings ``ValueError`` in the command line's words: each option field the message
    names becomes its flag (``batch_size`` -> ``--batch-size``); quoted values stay as they are."""
    names = [f.name for f in dataclasses.fields(settings_type) if f.name not in positional]
    pattern = r"(?<![\w'-])(" + "|".join(map(re.escape, names)) + r")(?![\w'])"
    return re.sub(pattern, lambda m: "--" + m[1].replace("_", "-"), message)


def _settings(parser: argparse.ArgumentParser, settings_type, args, positional=()):
    """``settings_type`` from the parsed ``args``; its check failing is the parser's error."""
    try:
        return settings_type(**vars(args))
    except ValueError as e:
        parser.error(_in_flags(str(e), settings_type, positional))


def _train_default_parser() -> argparse.ArgumentParser:
    from .. import train_default

    d = train_default.DefaultTrainingSettings()
    p = argparse.ArgumentParser(prog="omnicache train-default", description=train_default.__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=d.steps, help="DiT optimisation steps")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out-dir", type=Path, default=d.out_dir)
    p.add_argument("--device", default=d.device)
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (0: torch's default)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--ema", type=float, default=d.ema)
    p.add_argument("--hidden-size", type=int, default=d.hidden_size)
    p.add_argument("--depth", type=int, default=d.depth)
    p.add_argument("--num-heads", type=int, default=d.num_heads)
    p.add_argument("--shift-prob", type=float, default=d.shift_prob, help="probability of a 1-px shift per DiT sample")
    p.add_argument("--classifier-steps", type=int, default=d.classifier_steps)
    p.add_argument("--classifier-width", type=int, default=d.classifier_width)
    p.add_argument("--guidance", type=float, default=d.guidance, help="default classifier-free guidance scale")
    p.add_argument("--sample-steps", type=int, default=d.sample_steps)
    p.add_argument("--eval-samples", type=int, default=d.eval_samples,
                   help="samples per sampler for the class accuracy")
    return p


def cmd_train_default(argv) -> int:
    """``omnicache train-default``: trains the embedded model; returns 0."""
    from ..train_default import DefaultTrainingSettings, train

    parser = _train_default_parser()
    settings = _settings(parser, DefaultTrainingSettings, parser.parse_args(argv))
    train(settings, command="omnicache train-default " + shlex.join(argv))
    return 0


def _train_arena_parser() -> argparse.ArgumentParser:
    from ..arena import train as arena_train

    d = {f.name: f.default for f in dataclasses.fields(arena_train.ArenaTrainingSettings)}

    def per_arena(key):  # "flux 1800, latte 9000"
        return ", ".join(f"{name} {values[key]}" for name, values in arena_train.ARENA_DEFAULTS.items())

    p = argparse.ArgumentParser(prog="omnicache train-arena", description=arena_train.__doc__.split("\n\n")[0])
    p.add_argument("name", help=f"the arena to train: {', '.join(arena_train.ARENAS)}")
    p.add_argument("--steps", type=int, default=None, help=f"optimisation steps ({per_arena('steps')})")
    p.add_argument("--threads", type=int, default=d["threads"], help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the package data folder)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"samples (clips) a step ({per_arena('batch_size')})")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (1e-3)")
    p.add_argument("--warmup", type=int, default=d["warmup"])
    p.add_argument("--ema", type=float, default=d["ema"])
    p.add_argument("--label-dropout", type=float, default=d["label_dropout"])
    p.add_argument("--guidance", "--true-cfg-scale", "--guidance-scale", dest="guidance", type=float, default=None,
                   help="the default guidance shipped with the arena (Flux's true_cfg_scale 2, Latte's guidance_scale 4)")
    p.add_argument("--min-snr", type=float, default=None,
                   help="Latte: Min-SNR-gamma loss weighting (5; 0: plain v-prediction loss); Flux: must be 0")
    p.add_argument("--eval-samples", type=int, default=d["eval_samples"],
                   help="uncached samples for the class accuracy (0: none)")
    p.add_argument("--eval-steps", type=int, nargs="+", default=list(d["eval_steps"]),
                   help="sampling steps of the evaluations")
    p.add_argument("--log-every", type=int, default=d["log_every"])
    return p


def cmd_train_arena(argv) -> int:
    """``omnicache train-arena NAME``: trains the arena NAME (flux, latte); returns 0."""
    from ..arena.train import ArenaTrainingSettings, train

    parser = _train_arena_parser()
    settings = _settings(parser, ArenaTrainingSettings, parser.parse_args(argv), positional=("name",))
    train(settings, command="omnicache train-arena " + shlex.join(argv))
    return 0
