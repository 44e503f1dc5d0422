"""The embedded default model: a class-conditional DiT trained on scikit-learn's digits
(8x8, 1 channel, values in [-1, 1], 10 classes) and a digit classifier for the
class-accuracy metric. Both ship as safetensors in ``omnicache/data/`` with
``default_model.json`` (config, training record); ``omnicache.train_default`` makes them.

Every file is validated on load; a malformed one raises ``ValueError`` naming the field
or tensor.
"""

import dataclasses
import importlib.resources
import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from ..io import check_state, read_safetensors
from .model import DiT, DiTConfig

SPLIT_SEED = 0  # the digits' train/held-out split never changes with a training seed
HELDOUT_FRACTION = 0.2

__all__ = ["DigitClassifier", "default_info", "load_default", "load_classifier", "default_l2c_plan", "DEFAULT_JSON"]

DEFAULT_JSON = "default_model.json"
FORMAT_VERSION = 1
MAX_GUIDANCE = 100.0  # a default_guidance beyond this is a broken record, not a tuned scale


class DigitClassifier(nn.Module):
    """A compact CNN for (B, 1, 8, 8) digits in [-1, 1] -> (B, num_classes) logits."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),  # (B, w, 8, 8)
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # (B, 2w, 4, 4)
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # (B, 4w, 2, 2)
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(16 * width, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def _source(data_dir, name):
    if data_dir is None:
        return importlib.resources.files("omnicache").joinpath("data", name)
    return Path(data_dir) / name


def _field(obj, path, kind, where):
    """obj[path...] checked to be of type ``kind``; errors name the dotted field."""
    cur = obj
    for i, key in enumerate(path):
        if not isinstance(cur, dict) or key not in cur:
            raise ValueError(f"{where}: missing field '{'.'.join(path[: i + 1])}'")
        cur = cur[key]
    if kind is float:
        ok = isinstance(cur, (int, float)) and not isinstance(cur, bool) and math.isfinite(cur)
    else:
        ok = isinstance(cur, kind) and not isinstance(cur, bool)
    if not ok:
        raise ValueError(f"{where}: field '{'.'.join(path)}' must be {kind.__name__}, got {cur!r}")
    return cur


def _file_name(info, path, where):
    name = _field(info, path, str, where)
    if not name or Path(name).name != name:
        raise ValueError(f"{where}: field '{'.'.join(path)}' must be a plain file name, got {name!r}")
    return name


def default_info(data_dir=None) -> dict:
    """The validated ``default_model.json`` (from the package, or ``data_dir``)."""
    where = DEFAULT_JSON
    try:
        info = json.loads(_source(data_dir, DEFAULT_JSON).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise ValueError(f"{where}: top level must be an object")
    version = _field(info, ["format_version"], int, where)
    if version != FORMAT_VERSION:
        raise ValueError(f"{where}: field 'format_version' must be {FORMAT_VERSION}, got {version}")
    _file_name(info, ["dit", "weights"], where)
    _file_name(info, ["classifier", "weights"], where)
    for path in (["classifier", "num_classes"], ["classifier", "width"], ["default_steps"]):
        value = _field(info, path, int, where)
        if value < 1:
            raise ValueError(f"{where}: field '{'.'.join(path)}' must be an int >= 1, got {value}")
    guidance = _field(info, ["default_guidance"], float, where)
    if not 0.0 <= guidance <= MAX_GUIDANCE:
        raise ValueError(f"{where}: field 'default_guidance' must be a CFG scale in [0, {MAX_GUIDANCE:g}], "
                         f"got {guidance!r}")
    dit_config(info, where)
    return info


def dit_config(info, where=DEFAULT_JSON) -> DiTConfig:
    cfg = _field(info, ["dit", "config"], dict, where)
    names = [f.name for f in dataclasses.fields(DiTConfig)]
    for key in cfg:
        if key not in names:
            raise ValueError(f"{where}: unknown field 'dit.config.{key}'")
    for key in names:
        if key not in cfg:
            raise ValueError(f"{where}: missing field 'dit.config.{key}'")
    try:
        return DiTConfig(**cfg)
    except ValueError as e:
        raise ValueError(f"{where}: field 'dit.config': {e}") from None


def _load_state(build, source, device, dtype, field):
    """``build()`` with the weights of a safetensors file, after checking names, shapes and
    dtypes against a skeleton built on the meta device: sizes from the config are checked
    against the file before any memory is allocated for them. ``field`` names the config
    in ``default_model.json`` that the sizes come from."""
    where = getattr(source, "name", str(source))
    tensors = read_safetensors(source, where)
    with torch.device("meta"):
        expected = build().state_dict()  # shapes only, nothing allocated
    check_state(tensors, expected, where, hint=f" (from {DEFAULT_JSON} field {field})")
    module = build()
    module.load_state_dict({k: v.float() for k, v in tensors.items()})
    return module.to(device=device, dtype=dtype).eval()


def load_default(device="cpu", dtype=torch.float32, data_dir=None) -> DiT:
    """The embedded default DiT (eval mode) on ``device`` in ``dtype``.

    ``model.default_guidance`` is the guidance scale it was tuned for; ``generate`` uses
    it when no ``guidance`` is given."""
    info = default_info(data_dir)
    config = dit_config(info)
    model = _load_state(lambda: DiT(config), _source(data_dir, info["dit"]["weights"]), device, dtype, "'dit.config'")
    model.default_guidance = float(info["default_guidance"])
    return model


def load_classifier(device="cpu", dtype=torch.float32, data_dir=None) -> DigitClassifier:
    """The embedded digit classifier (eval mode): (B, 1, 8, 8) in [-1, 1] -> logits."""
    info = default_info(data_dir)
    cls = info["classifier"]
    return _load_state(lambda: DigitClassifier(num_classes=cls["num_classes"], width=cls["width"]),
                       _source(data_dir, cls["weights"]), device, dtype, "'classifier.width'/'classifier.num_classes'")


def default_l2c_plan(sampler: str, steps: int):
    """The Learning-to-Cache plan shipped for the embedded model (``l2c-<sampler>-<steps>.json``,
    written by ``omnicache train-router --correction``, at the model's default guidance),
    as a path, or None if none ships for this sampler and step count."""
    source = _source(None, f"l2c-{sampler}-{steps}.json")
    return str(source) if source.is_file() else None


def digits_split():
    """(x_train, y_train, x_heldout, y_heldout): (N, 1, 8, 8) float32 in [-1, 1], (N,) long."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # 0..16 -> [-1, 1]
    y = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_held = train_test_split(
        torch.arange(len(y)).numpy(), test_size=HELDOUT_FRACTION, random_state=SPLIT_SEED, stratify=data.target
    )
    idx_train, idx_held = torch.from_numpy(idx_train), torch.from_numpy(idx_held)
    return x[idx_train], y[idx_train], x[idx_held], y[idx_held]
