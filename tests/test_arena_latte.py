"""omnicache.arena: the trained Latte moving-digits arena, loaded from package data and
driven by the unmodified diffusers.LattePipeline (CPU, small)."""

import shutil
import socket

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install omnicache[diffusers])")

from omnicache.arena import digits_images, digits_inputs, load_digits_pipeline  # noqa: E402
from omnicache.arena import flux as arena_flux  # noqa: E402
from omnicache.arena import latte as arena_latte  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(one_thread):
    return load_digits_pipeline("latte")


def _run(pipe, labels, steps, seed=0, **kw):
    out = pipe(**digits_inputs(pipe, labels, **kw), num_inference_steps=steps,
               generator=torch.Generator().manual_seed(seed))
    return digits_images(pipe, out)


def test_loads_from_package_data_without_network(monkeypatch):
    from diffusers import DDIMScheduler, LattePipeline, LatteTransformer3DModel

    def no_network(*args, **kwargs):
        raise AssertionError("load_digits_pipeline tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = load_digits_pipeline("latte")
    assert type(p) is LattePipeline and type(p.transformer) is LatteTransformer3DModel
    assert type(p.scheduler) is DDIMScheduler and p.scheduler.config.prediction_type == "v_prediction"
    assert p.vae is None and p.text_encoder is None and p.tokenizer is None
    cfg = p.transformer.config
    assert cfg.video_length == arena_latte.FRAMES and cfg.sample_size == arena_latte.CANVAS
    assert cfg.cross_attention_dim is not None  # the class enters through cross-attention
    files = arena_flux.arena_dir("latte")
    total = sum(files.joinpath(f).stat().st_size for f in (arena_flux.CONFIG_FILE, arena_flux.WEIGHTS_FILE,
                arena_flux.LABELS_FILE, arena_flux.SCHEDULER_FILE, arena_flux.ARENA_JSON))
    assert total <= 10e6


def test_inputs_frames_and_guidance(pipe):
    kw = digits_inputs(pipe, [0, 1, 2])
    assert kw["height"] == kw["width"] == arena_latte.CANVAS * 8 and kw["video_length"] == arena_latte.FRAMES
    assert kw["prompt_embeds"].shape == kw["negative_prompt_embeds"].shape == (3, arena_flux.TEXT_TOKENS, 64)
    assert kw["guidance_scale"] > 1 and kw["output_type"] == "latent"
    assert "negative_prompt_embeds" not in digits_inputs(pipe, [0], guidance=1.0)
    with pytest.raises(ValueError, match="guidance_scale"):
        digits_inputs(pipe, [0], guidance_scale=0.5)
    with pytest.raises(ValueError, match="true_cfg_scale"):
        digits_inputs(pipe, [0], true_cfg_scale=2.0)  # Flux's name, not Latte's
    video = _run(pipe, [3, 5], steps=4)
    assert video.shape == (2, arena_latte.FRAMES, 1, arena_latte.CANVAS, arena_latte.CANVAS)
    assert video.min() >= 0 and video.max() <= 1
    assert torch.equal(video, _run(pipe, [3, 5], steps=4)) and not torch.equal(video, _run(pipe, [3, 5], 4, seed=1))


def test_moving_digits_bounce_inside_the_canvas():
    from omnicache.runtime.default import digits_split

    x, _, _, _ = digits_split()
    clips = arena_latte.moving_digits(x[:16], torch.Generator().manual_seed(0))
    assert clips.shape == (16, 1, arena_latte.FRAMES, arena_latte.CANVAS, arena_latte.CANVAS)
    ink = (clips + 1).sum(dim=(-1, -2))  # every frame holds the whole digit: the same ink
    assert torch.allclose(ink, ink[:, :, :1].expand_as(ink))
    crops = arena_latte.frame_digits((clips.transpose(1, 2) + 1) / 2)
    assert torch.allclose(crops[0], (x[0] + 1) / 2)  # the window of most ink is the digit
    moved = (clips[:, :, 1:] != clips[:, :, :-1]).flatten(2).any(-1)
    assert moved.all()  # speed >= 1 pixel a frame on both axes: every frame differs


def test_per_frame_class_accuracy_of_uncached_clips(pipe):
    """The arena's bar: the digit classifier recognises >= 80% of uncached frames as their
    class at the shipped guidance (here 10 clips, 80 frames, 20 steps); the class reaches the
    frames through cross-attention, so guidance helps."""
    from omnicache.arena.train import sample_accuracy
    from omnicache.runtime.default import load_classifier

    clf = load_classifier()
    weak = sample_accuracy(pipe, clf, 10, steps=20, seed=3, guidance=1.0)
    shipped = sample_accuracy(pipe, clf, 10, steps=20, seed=3)
    assert pipe.omnicache_arena.true_cfg_scale > 1
    assert shipped >= 0.8 and shipped > weak


def test_damaged_package_data_names_the_field(tmp_path):
    src = arena_flux.arena_dir("latte")
    for f in (arena_flux.CONFIG_FILE, arena_flux.WEIGHTS_FILE, arena_flux.LABELS_FILE, arena_flux.SCHEDULER_FILE,
              arena_flux.ARENA_JSON):
        shutil.copyfile(src.joinpath(f), tmp_path / f)
    import json

    record = json.loads((tmp_path / arena_flux.ARENA_JSON).read_text())
    record["guidance_scale"] = "high"
    (tmp_path / arena_flux.ARENA_JSON).write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"latte/arena.json: field 'guidance_scale'"):
        load_digits_pipeline("latte", data_dir=tmp_path)
    from safetensors.torch import save_file

    save_file({"prompt_embeds": torch.zeros(11, 4, 32)}, str(tmp_path / arena_flux.LABELS_FILE))
    with pytest.raises(ValueError, match=r"labels.safetensors"):
        load_digits_pipeline("latte", data_dir=tmp_path)
