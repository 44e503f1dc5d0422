"""The embedded default model: loading, its record, sample quality, malformed files."""

import importlib.resources
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from omnicache.metrics import class_accuracy
from omnicache.runtime.default import DEFAULT_JSON, default_info, load_classifier, load_default
from omnicache.runtime.model import DiT, DiTConfig
from omnicache.runtime.samplers import sample


@pytest.fixture(scope="module")
def info():
    return default_info()


@pytest.fixture(scope="module")
def model():
    return load_default()


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def test_load_default(model, info):
    assert isinstance(model, DiT) and not model.training
    assert model.config == DiTConfig(**info["dit"]["config"])
    assert model.config.depth >= 8 and model.config.num_classes == 10
    assert (model.config.in_channels, model.config.input_size) == (1, 8)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    x = torch.randn(2, 1, 8, 8)
    assert model(x, torch.rand(2), torch.tensor([3, 10])).shape == x.shape
    half = load_default(dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_embedded_record(info):
    data = importlib.resources.files("omnicache").joinpath("data")
    sizes = [len(data.joinpath(info[k]["weights"]).read_bytes()) for k in ("dit", "classifier")]
    assert sum(sizes) <= 10 * 2**20
    training = info["training"]
    for key in ("command", "steps", "wall_time_s", "device", "torch_version", "final_loss", "date"):
        assert key in training, key
    assert training["command"].startswith("python -m omnicache.train_default")
    assert training["steps"] > 0 and training["final_loss"] > 0
    assert info["classifier"]["heldout_accuracy"] >= 0.95
    assert 1.0 <= info["default_guidance"] <= 10.0


def test_classifier_heldout_accuracy(classifier, info):
    pytest.importorskip("sklearn", reason="the digits data set comes from scikit-learn")
    from omnicache.runtime.default import digits_split

    _, _, x_held, y_held = digits_split()
    assert len(y_held) == info["classifier"]["heldout_size"]
    acc = class_accuracy(classifier, x_held, y_held)
    assert acc == pytest.approx(info["classifier"]["heldout_accuracy"], abs=1e-6)
    assert acc >= 0.95


@pytest.mark.parametrize("sampler", ["flow", "ddim"])
def test_guided_samples_are_recognised(model, classifier, info, sampler):
    labels = torch.arange(64) % 10
    images = sample(model, labels, 50, sampler=sampler, guidance=info["default_guidance"], seed=0)
    assert images.shape == (64, 1, 8, 8) and torch.isfinite(images).all()
    acc = class_accuracy(classifier, images.clamp(-1, 1), labels)
    assert acc >= 0.9, f"{sampler}: {acc:.3f} of guided samples recognised as their class"


# Malformed files: every case names the field or tensor at fault.


@pytest.fixture
def data_dir(tmp_path, info):
    src = importlib.resources.files("omnicache").joinpath("data")
    for name in (DEFAULT_JSON, info["dit"]["weights"], info["classifier"]["weights"]):
        (tmp_path / name).write_bytes(src.joinpath(name).read_bytes())
    load_default(data_dir=tmp_path)  # the copy itself is fine
    return tmp_path


def edit_json(data_dir, fn):
    path = data_dir / DEFAULT_JSON
    info = json.loads(path.read_text())
    fn(info)
    path.write_text(json.dumps(info))


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda i: i["dit"]["config"].pop("depth"), "'dit.config.depth'"),
        (lambda i: i["dit"]["config"].update(hidden_size="128"), "hidden_size"),
        (lambda i: i["dit"]["config"].update(colour=3), "'dit.config.colour'"),
        (lambda i: i["dit"].pop("config"), "'dit.config'"),
        (lambda i: i["dit"].update(weights="../default_dit.safetensors"), "'dit.weights'"),
        (lambda i: i.update(format_version=2), "'format_version'"),
        (lambda i: i.update(default_guidance="high"), "'default_guidance'"),
        (lambda i: i["classifier"].pop("width"), "'classifier.width'"),
        (lambda i: i["dit"]["config"].update(depth=7), "unexpected tensor 'blocks.7"),
        (lambda i: i["dit"]["config"].update(num_heads=3), "num_heads"),
    ],
)
def test_malformed_json_rejected(data_dir, edit, match):
    edit_json(data_dir, edit)
    with pytest.raises(ValueError, match=match):
        load_default(data_dir=data_dir)


def test_invalid_json_rejected(data_dir):
    (data_dir / DEFAULT_JSON).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_default(data_dir=data_dir)


def test_malformed_safetensors_rejected(data_dir, info):
    path = data_dir / info["dit"]["weights"]
    state = load_file(path)
    good = dict(state)

    state.pop("blocks.3.attn.qkv.weight")
    save_file(state, path)
    with pytest.raises(ValueError, match="missing tensor 'blocks.3.attn.qkv.weight'"):
        load_default(data_dir=data_dir)

    state = dict(good, **{"final_layer.linear.bias": torch.zeros(5, dtype=torch.float16)})
    save_file(state, path)
    with pytest.raises(ValueError, match="tensor 'final_layer.linear.bias' has shape"):
        load_default(data_dir=data_dir)

    state = dict(good, extra=torch.zeros(1))
    save_file(state, path)
    with pytest.raises(ValueError, match="unexpected tensor 'extra'"):
        load_default(data_dir=data_dir)

    bad = good["x_embedder.bias"].clone().float()
    bad[0] = float("nan")
    save_file(dict(good, **{"x_embedder.bias": bad}), path)
    with pytest.raises(ValueError, match="'x_embedder.bias' has non-finite"):
        load_default(data_dir=data_dir)

    save_file(dict(good, **{"x_embedder.bias": good["x_embedder.bias"].to(torch.int32)}), path)
    with pytest.raises(ValueError, match="'x_embedder.bias' must be floating"):
        load_default(data_dir=data_dir)

    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="default_dit.safetensors: not a valid safetensors"):
        load_default(data_dir=data_dir)

    cls_path = data_dir / info["classifier"]["weights"]
    cls_path.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="digit_classifier.safetensors: not a valid safetensors"):
        load_classifier(data_dir=data_dir)


def test_missing_file_rejected(data_dir, info):
    (data_dir / info["classifier"]["weights"]).unlink()
    with pytest.raises(FileNotFoundError):
        load_classifier(data_dir=data_dir)


# Issue 15.7: every field checked, sizes checked against the file before allocating.


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda i: i["dit"]["config"].update(mlp_ratio=float("nan")), "dit.config.*mlp_ratio must be a finite"),
        (lambda i: i["dit"]["config"].update(mlp_ratio=float("inf")), "dit.config.*mlp_ratio must be a finite"),
        (lambda i: i["dit"]["config"].update(mlp_ratio=1e-9), "mlp_ratio .* MLP width >= 1"),
        (lambda i: i["classifier"].update(width=-4), "'classifier.width' must be an int >= 1, got -4"),
        (lambda i: i["classifier"].update(num_classes=0), "'classifier.num_classes' must be an int >= 1"),
        (lambda i: i.update(default_steps=-5), "'default_steps' must be an int >= 1, got -5"),
        (lambda i: i.update(default_guidance=-1e9), r"'default_guidance' must be a CFG scale in \[0, 100\]"),
        (lambda i: i.update(default_guidance=1e9), "'default_guidance' must be a CFG scale"),
        (lambda i: i["dit"]["config"].update(hidden_size=10**7, num_heads=4),
         r"tensor '.*' has shape \(.*\), expected \(.*0000000.*\) \(from default_model.json field 'dit.config'\)"),
    ],
)
def test_fields_out_of_range_rejected(data_dir, edit, match):
    edit_json(data_dir, edit)
    with pytest.raises(ValueError, match=match):
        load_default(data_dir=data_dir)
    if "dit.config" not in match:  # the classifier's own sizes do not depend on the DiT's
        with pytest.raises(ValueError, match=match):
            load_classifier(data_dir=data_dir)


def test_classifier_size_checked_before_allocating(data_dir):
    edit_json(data_dir, lambda i: i["classifier"].update(width=10**6))  # 4.6e12 conv weights
    with pytest.raises(ValueError, match=r"tensor '(features|head).*' has shape .*, expected \(.*000000.*'classifier.width'"):
        load_classifier(data_dir=data_dir)


@pytest.mark.parametrize("ratio", [float("nan"), float("inf"), -1.0, True])
def test_dit_config_mlp_ratio(ratio):
    with pytest.raises(ValueError, match="DiTConfig.mlp_ratio must be a finite positive number"):
        DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                  num_classes=2, mlp_ratio=ratio)
