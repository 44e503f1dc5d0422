"""Declarative model adapters: which blocks a diffusers transformer runs, and each block
class's inputs and outputs by name.

A model is one :data:`MODELS` entry (its ``ModuleList`` attributes, in the order its
``forward`` runs them, :class:`ModelSpec`) plus a :data:`BLOCKS` entry for each block class
(which streams it takes and returns by name; optionally its attention / MLP branches and the
``forward`` arguments that carry the batch, :class:`BlockIO`). The tables live by family, one
module each in this package, each defining ``MODELS`` and ``BLOCKS``. :func:`register`
declares any other model (your own DiT, a fork with renamed modules, another engine's
classes), checked at registration and again, against the model itself, when caching is
enabled (:func:`model_blocks`): a declaration that does not fit is refused with the field
named, never in the middle of a call.
"""

from __future__ import annotations

import importlib
import pkgutil

import torch

from .spec import E, H, BlockIO, BoundBlock, ModelSpec, return_arities

__all__ = ["BlockIO", "ModelSpec", "MODELS", "BLOCKS", "register", "model_blocks", "model_grid", "BoundBlock",
           "H", "E", "return_arities"]

MODELS: dict[str, ModelSpec] = {}
BLOCKS: dict[str, BlockIO] = {}
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):  # every table module, by family
    if _info.name != "spec":
        _table = importlib.import_module(f"{__name__}.{_info.name}")
        for _name, _io in _table.BLOCKS.items():
            assert BLOCKS.setdefault(_name, _io) == _io, f"two different entries for block class {_name}"
        for _name, _spec in _table.MODELS.items():
            assert MODELS.setdefault(_name, _spec) is _spec, f"two entries for model class {_name}"
_CHECKED: set = set()  # block classes whose forward was checked against their entry


def _class_name(value, field: str) -> str:
    if isinstance(value, type):
        return value.__name__
    if isinstance(value, str) and value.isidentifier():
        return value
    raise ValueError(f"register: {field} must be a class or a class name, got {value!r}")


def register(model, spec: ModelSpec, blocks: dict | None = None, *, replace: bool = False) -> None:
    """Declare a transformer class the table does not have (or, with ``replace``, one it has).

    Args:
        model: the model class (or its name).
        spec: its :class:`ModelSpec` (block lists in the order ``forward`` runs them, ...).
        blocks: ``{block class (or name): BlockIO}`` for block classes the table does not have.

    Checked now: the types of every field; where a class is given, that its ``forward`` takes
    the declared streams and batched arguments and returns as many values as declared. Checked
    at :func:`~omnicache.integrations.diffusers.enable`: that the model has the block lists,
    every block class is declared, and the branch submodules exist.
    """
    name = _class_name(model, "model")
    if not isinstance(spec, ModelSpec):
        raise ValueError(f"register: spec must be a ModelSpec, got {type(spec).__name__}")
    new = {}
    for key, io in (blocks or {}).items():
        bname = _class_name(key, "blocks key")
        if not isinstance(io, BlockIO):
            raise ValueError(f"register: blocks[{bname!r}] must be a BlockIO, got {type(io).__name__}")
        if isinstance(key, type):
            io.check_class(key)
        if bname in BLOCKS and BLOCKS[bname] != io and not replace:
            raise ValueError(f"register: block class {bname} is already declared ({BLOCKS[bname]}); "
                             f"pass replace=True to change it")
        new[bname] = io
    if name in MODELS and not replace:
        raise ValueError(f"register: {name} is already supported; pass replace=True to change its entry")
    BLOCKS.update(new)
    for bname in new:
        _CHECKED.discard(bname)
    MODELS[name] = spec


def model_grid(transformer):
    """The token grid of a supported video transformer (:attr:`ModelSpec.grid`), or None."""
    spec = MODELS.get(type(transformer).__name__)
    return None if spec is None or spec.grid is None else tuple(spec.grid(transformer.config))


def model_blocks(transformer) -> list[BoundBlock]:
    """The blocks of a supported transformer in the order its ``forward`` runs them, each
    checked against its entry (block lists, block classes, streams, arity, branch submodules)."""
    cls = type(transformer).__name__
    spec = MODELS.get(cls)
    if spec is None:
        raise TypeError(f"omnicache.integrations.diffusers does not support {cls}; "
                        f"supported: {', '.join(MODELS)} (or declare it: omnicache.integrations.diffusers.register)")
    lists = []
    for i, name in enumerate(spec.blocks):
        blocks = getattr(transformer, name, None)
        if not isinstance(blocks, (torch.nn.ModuleList, list, tuple)) or \
                not all(isinstance(b, torch.nn.Module) for b in blocks):
            raise ValueError(f"ModelSpec.blocks[{i}] of {cls}: {cls}.{name} is not a list of blocks "
                             f"(got {type(blocks).__name__})")
        lists.append([(blk, name in spec.temporal) for blk in blocks])
    if spec.interleave and len({len(g) for g in lists}) > 1:
        raise ValueError(f"ModelSpec.interleave of {cls}: the lists {spec.blocks} have different lengths")
    modules = [blk for group in zip(*lists) for blk in group] if spec.interleave else \
        [blk for group in lists for blk in group]
    out = []
    for blk, temporal in modules:
        bname = type(blk).__name__
        io = BLOCKS.get(bname)
        if io is None:
            raise TypeError(f"omnicache: block class {bname} of {cls} is not supported "
                            f"(supported blocks: {', '.join(BLOCKS)}; or declare it: register(..., blocks=...))")
        if bname not in _CHECKED:
            io.check_class(type(blk))
            for field in ("attn", "mlp"):
                absent = [a for a in getattr(io, field) if not hasattr(blk, a)]
                if absent:
                    raise ValueError(f"BlockIO.{field} of {bname}: the block has no submodule {absent[0]!r}")
            _CHECKED.add(bname)
        out.append(BoundBlock(blk, io, temporal))
    return out
