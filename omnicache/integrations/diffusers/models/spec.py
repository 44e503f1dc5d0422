"""What a model table entry says: :class:`ModelSpec` (which block lists a transformer runs, in
what order) and :class:`BlockIO` (a block class's streams, branches and batched arguments by
name), each validated on construction (a wrong field is a ``ValueError`` naming it), and
:class:`BoundBlock` (one block with its entry: reads its streams from a call, packs what it
returns)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap

import torch

from ....plan import BRANCH_NAMES

__all__ = ["H", "E", "BlockIO", "ModelSpec", "BoundBlock", "return_arities"]

H, E = "hidden_states", "encoder_hidden_states"


def _names(owner: str, field: str, value, *, empty=True) -> tuple:
    """``value`` as a tuple of identifiers, else a ``ValueError`` naming ``owner.field``."""
    if isinstance(value, str) or not isinstance(value, (tuple, list)) or \
            not all(isinstance(v, str) and v.isidentifier() for v in value) or (not empty and not value):
        raise ValueError(f"{owner}.{field} must be a {'' if empty else 'non-empty '}tuple of attribute or "
                         f"argument names, got {value!r}")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class BlockIO:
    """A block class's streams. ``returns``: the names of what ``forward`` returns, in order;
    a single name means it returns that tensor alone. ``cached``: the returned streams whose
    residual is cached; by default ``hidden_states`` and, for joint-attention blocks,
    ``encoder_hidden_states`` (a second stream of another name, an audio stream say, is named
    here). ``hidden_states`` must be one of them; each must also be an argument of ``forward``.
    Any other name in ``returns`` is an argument the block returns unchanged (a reused block
    returns the value it was given). ``args``: ``(name, argument)`` pairs for a ``forward`` that
    calls a stream otherwise (``("hidden_states", "x")``); every name above is the stream's.

    ``attn`` / ``mlp``: the submodules forming the block's attention branch (``k = 0`` of a
    plan) and MLP branch (``k = 1``); their outputs are taken BEFORE the block applies its
    adaLN gate, so ``granularity="branch"`` caches them and the block's own code applies the
    current step's gate. An attribute that is ``None`` on a model (PixArt's ``attn2`` on DiT) is
    skipped. Empty (the default): no branches; branch plans run per block.

    ``named``: the submodules of each named branch (``self_attn``, ``cross_attn``, ``mlp``) for
    plans over named branches (PAB, T-GATE); a block in one of its model's ``temporal`` lists
    reports its ``self_attn`` as ``temporal_attn``. Empty: ``self_attn`` is the attention branch.

    ``batched``: the ``forward`` arguments whose first dimension is the batch (per-sample
    decisions run a sub-batch of them through the block); arguments not named (rotary
    embeddings, ``*_kwargs``) are passed unchanged. ``None``: undeclared, and
    ``enable(..., per_sample=True)`` is refused for the model."""

    returns: tuple[str, ...] = (H,)
    attn: tuple[str, ...] = ()
    mlp: tuple[str, ...] = ()
    batched: tuple[str, ...] | None = None
    named: tuple[tuple[str, tuple[str, ...]], ...] = ()
    cached: tuple[str, ...] | None = None
    args: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        set_ = _setter(self)
        set_("returns", _names("BlockIO", "returns", self.returns, empty=False))
        if len(set(self.returns)) != len(self.returns):
            raise ValueError(f"BlockIO.returns names a value twice: {self.returns!r}")
        if self.cached is None:
            set_("cached", tuple(n for n in (H, E) if n in self.returns))
        set_("cached", _names("BlockIO", "cached", self.cached))
        if H not in self.cached:
            raise ValueError(f"BlockIO.cached must hold {H!r}, the stream every block carries, got "
                             f"{self.cached!r} (returns {self.returns!r})")
        if not set(self.cached) <= set(self.returns):
            raise ValueError(f"BlockIO.cached must name returned streams ({self.returns!r}), got {self.cached!r}")
        set_("attn", _names("BlockIO", "attn", self.attn))
        set_("mlp", _names("BlockIO", "mlp", self.mlp))
        if self.batched is not None:
            set_("batched", _names("BlockIO", "batched", self.batched))
        named = tuple(self.named)
        for entry in named:
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and entry[0] in BRANCH_NAMES):
                raise ValueError(f"BlockIO.named must hold (branch, submodules) pairs with a branch in "
                                 f"{BRANCH_NAMES}, got {entry!r}")
            _names("BlockIO", f"named[{entry[0]!r}]", entry[1])
        set_("named", tuple((n, tuple(s)) for n, s in named))
        args = tuple(self.args.items()) if isinstance(self.args, dict) else tuple(self.args)
        for entry in args:
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
                raise ValueError(f"BlockIO.args must hold (name, argument) pairs, got {entry!r}")
            _names("BlockIO", "args", entry)
        set_("args", tuple(tuple(e) for e in args))

    @property
    def passed(self) -> tuple[str, ...]:
        """The returned names that are not cached: arguments the block returns unchanged."""
        return tuple(n for n in self.returns if n not in self.cached)

    def arg(self, name: str) -> str:
        """The ``forward`` argument that carries ``name``."""
        return dict(self.args).get(name, name)

    @property
    def bare(self) -> bool:
        return len(self.returns) == 1

    @property
    def has_branches(self) -> bool:
        return bool(self.attn) and bool(self.mlp)

    def check_class(self, cls: type) -> None:
        """Refuse this entry for block class ``cls`` where it cannot fit: a stream or batched
        argument that ``forward`` does not take, or a return arity its ``return`` statements
        never have (read from its source, where it has one)."""
        params = inspect.signature(cls.forward).parameters
        takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
        for field, names in (("returns", [self.arg(n) for n in self.returns]), ("batched", self.batched or ())):
            missing = [n for n in names if n not in params and not takes_any]
            if missing:
                raise ValueError(f"BlockIO.{field} of {cls.__name__}: {cls.__name__}.forward takes no {missing[0]!r}"
                                 + (" (a stream named otherwise is declared in BlockIO.args)" if field == "returns"
                                    else ""))
        arities = return_arities(cls.forward)
        if arities and len(self.returns) not in arities:
            raise ValueError(f"BlockIO.returns of {cls.__name__}: {len(self.returns)} name(s) {self.returns}, but "
                             f"{cls.__name__}.forward returns {' or '.join(map(str, sorted(arities)))} value(s)")


def _setter(obj):
    """``setattr`` on a frozen dataclass, for normalising fields in ``__post_init__``."""
    return lambda name, value: object.__setattr__(obj, name, value)


def return_arities(fn) -> set:
    """The arities of ``fn``'s ``return`` statements, read from its source: a tuple literal has
    its length, a name 1 (unless ``fn`` binds that name to a tuple literal somewhere); empty
    (unknown) where any return is something else (a call, a starred tuple) or the source
    cannot be read."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return set()
    nodes, stack = [], list(tree.body[0].body)
    while stack:  # fn's own statements: a nested function's returns are its own
        node = stack.pop()
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            nodes.append(node)
            stack.extend(ast.iter_child_nodes(node))
    tuples = {t.id for n in nodes if isinstance(n, (ast.Assign, ast.AnnAssign)) and isinstance(n.value, ast.Tuple)
              for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
    out = set()
    for node in nodes:
        if not isinstance(node, ast.Return):
            continue
        v = node.value
        if isinstance(v, ast.Tuple) and not any(isinstance(e, ast.Starred) for e in v.elts):
            out.add(len(v.elts))
        elif isinstance(v, ast.Name) and v.id not in tuples:
            out.add(1)
        else:
            return set()
    return out


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """``blocks``: the ``ModuleList`` attributes, in the order ``forward`` runs them;
    ``interleave``: ``forward`` alternates between the lists (block ``i`` of each in turn)
    instead of running them one after the other; ``stack``: one residual may span several
    blocks (False where ``forward`` reshapes between blocks, so ``step`` plans run per block);
    ``norm1``: the attribute of the first block whose output TeaCache measures (None: the model
    has no such signal); ``temporal``: the block lists whose self-attention attends across
    frames (named branch ``temporal_attn``); ``grid``: the model config -> the ``(frames, rows,
    columns)`` token grid of a video model whose blocks lay out ``(batch x frames, rows x
    columns)`` / ``(batch x rows x columns, frames)``, for stage-aware filtering (None: no
    grid); ``batch_first``: the blocks run the batch on their first dimension (False where
    ``forward`` folds frames or tokens into it, as Latte does: per-sample decisions are then
    refused); ``note``: what the entry leaves uncached, and why (refiners, other streams)."""

    blocks: tuple[str, ...]
    interleave: bool = False
    stack: bool = True
    norm1: str | None = "norm1"
    temporal: tuple[str, ...] = ()
    grid: object = None
    batch_first: bool = True
    note: str = ""

    def __post_init__(self):
        set_ = _setter(self)
        set_("blocks", _names("ModelSpec", "blocks", self.blocks, empty=False))
        set_("temporal", _names("ModelSpec", "temporal", self.temporal))
        for field in ("interleave", "stack", "batch_first"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"ModelSpec.{field} must be true or false, got {getattr(self, field)!r}")
        if self.norm1 is not None and not (isinstance(self.norm1, str) and self.norm1.isidentifier()):
            raise ValueError(f"ModelSpec.norm1 must be an attribute name or None, got {self.norm1!r}")
        if not set(self.temporal) <= set(self.blocks):
            raise ValueError(f"ModelSpec.temporal must name lists of ModelSpec.blocks {self.blocks}, got {self.temporal}")
        if self.grid is not None and not callable(self.grid):
            raise ValueError(f"ModelSpec.grid must be a function of the model config, got {self.grid!r}")


class BoundBlock:
    """One block of a model with its I/O spec: reads its streams from a call's arguments
    and packs new values into what the block returns."""

    def __init__(self, module: torch.nn.Module, io: BlockIO, temporal: bool = False):
        self.module, self.io, self.temporal = module, io, temporal
        params = list(inspect.signature(type(module).forward).parameters)[1:]  # skip self
        names = {*(io.arg(n) for n in io.returns), *(io.batched or ())}
        self.pos = {n: params.index(n) if n in params else None for n in names}

    def locate(self, name: str, args, kwargs):
        """``(holder, key)`` of stream ``name`` in a call's ``args`` / ``kwargs``; None if absent."""
        a = self.io.arg(name)
        if a in kwargs:
            return kwargs, a
        if self.pos.get(a) is not None and self.pos[a] < len(args):
            return args, self.pos[a]
        return None

    def inputs(self, args, kwargs, passed: bool = False) -> dict:
        """``{stream name: tensor or None}`` for the cached streams of this call (and, with
        ``passed``, the returned arguments it passes through)."""
        out = {}
        for n in (self.io.returns if passed else self.io.cached):
            where = self.locate(n, args, kwargs)
            out[n] = None if where is None else where[0][where[1]]
        return out

    def with_input(self, args, kwargs, name: str, value):
        """``(args, kwargs)`` with stream ``name`` replaced by ``value``."""
        args, kwargs = list(args), dict(kwargs)
        holder, key = self.locate(name, args, kwargs)
        holder[key] = value
        return args, kwargs

    def outputs(self, out) -> dict:
        """``{stream name: tensor or None}`` from what the block returned."""
        if self.io.bare:
            return {self.io.returns[0]: out}
        return dict(zip(self.io.returns, out))

    def pack(self, values: dict):
        """What the block would return, from ``{stream name: tensor}``."""
        if self.io.bare:
            return values[self.io.returns[0]]
        return tuple(values.get(n) for n in self.io.returns)

    def branch_attrs(self, name: str) -> tuple:
        """The submodule attributes of branch ``name`` (:data:`omnicache.plan.BRANCH_NAMES`)."""
        if name == "attn":
            return self.io.attn
        if name == "mlp" and not self.io.named:
            return self.io.mlp
        named = dict(self.io.named)
        if not named:  # undeclared: the attention branch is the self-attention
            named = {"self_attn": self.io.attn}
        if name == "temporal_attn":
            return named.get("self_attn", ()) if self.temporal else ()
        if name == "self_attn" and self.temporal:
            return ()
        return named.get(name, ())

    def branches(self, names=("attn", "mlp")) -> list:
        """``[(kind, j, submodule)]``: ``kind`` the index of the branch in ``names`` (by
        default 0 = attention, 1 = MLP); ``j`` the submodule's index within its branch
        (``None`` attributes skipped)."""
        out = []
        for kind, attrs in enumerate(self.branch_attrs(n) for n in names):
            for j, name in enumerate(attrs):
                sub = getattr(self.module, name, None)
                if isinstance(sub, torch.nn.Module):
                    out.append((kind, j, sub))
        return out

    def sub_batch(self, args, kwargs, rows: torch.Tensor, batch: int):
        """``(args, kwargs)`` with every ``batched`` argument's rows ``rows`` (``index_select``
        on dim 0); a batch dimension of 1 broadcasts and is passed unchanged."""
        args, kwargs = list(args), dict(kwargs)
        for n in self.io.batched or ():
            if n in kwargs:
                holder, key = kwargs, n
            elif self.pos.get(n) is not None and self.pos[n] < len(args):
                holder, key = args, self.pos[n]
            else:
                continue
            x = holder[key]
            if not isinstance(x, torch.Tensor) or x.ndim == 0 or x.shape[0] == 1 and batch != 1:
                continue
            if x.shape[0] != batch:
                raise ValueError(f"omnicache: {type(self.module).__name__}.{n} has first dimension "
                                 f"{x.shape[0]}, declared batched (batch {batch})")
            holder[key] = x.index_select(0, rows)
        return tuple(args), kwargs
