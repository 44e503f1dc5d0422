"""omnicache.arena: the trained Flux digits arena, loaded from package data and driven by
the unmodified diffusers.FluxPipeline (CPU, small)."""

import shlex
import shutil
import socket

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install omnicache[diffusers])")
pytest.importorskip("transformers", reason="FluxPipeline needs transformers (pip install omnicache[diffusers])")

from omnicache.arena import digits_images, digits_inputs, load_digits_pipeline  # noqa: E402
from omnicache.arena import flux as arena_flux  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(one_thread):
    return load_digits_pipeline("flux")


def _run(pipe, labels, steps, seed=0, **kw):
    out = pipe(**digits_inputs(pipe, labels, **kw), num_inference_steps=steps,
               generator=torch.Generator().manual_seed(seed))
    return digits_images(pipe, out)


def test_loads_from_package_data_without_network(monkeypatch):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    def no_network(*args, **kwargs):
        raise AssertionError("load_digits_pipeline tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = load_digits_pipeline("flux")
    assert type(p) is FluxPipeline and type(p.transformer) is FluxTransformer2DModel
    assert type(p.scheduler) is FlowMatchEulerDiscreteScheduler and p.scheduler.config.use_dynamic_shifting
    assert p.vae is None and p.text_encoder is None and p.text_encoder_2 is None
    assert p.transformer.config.in_channels == 4 and not p.transformer.config.guidance_embeds
    assert all(t.dtype == torch.float32 for t in p.transformer.parameters())
    files = arena_flux.arena_dir("flux")
    total = sum(files.joinpath(f).stat().st_size for f in (arena_flux.CONFIG_FILE, arena_flux.WEIGHTS_FILE,
                arena_flux.LABELS_FILE, arena_flux.SCHEDULER_FILE, arena_flux.ARENA_JSON))
    assert total <= 10e6


def test_inputs_and_images_shapes_and_ranges(pipe):
    kw = digits_inputs(pipe, [0, 1, 2, 3])
    assert kw["height"] == kw["width"] == 64 and kw["output_type"] == "latent"
    cfg = pipe.transformer.config
    L, D, P = arena_flux.TEXT_TOKENS, cfg.joint_attention_dim, cfg.pooled_projection_dim
    assert kw["prompt_embeds"].shape == kw["negative_prompt_embeds"].shape == (4, L, D)
    assert kw["pooled_prompt_embeds"].shape == kw["negative_pooled_prompt_embeds"].shape == (4, P)
    assert kw["true_cfg_scale"] > 1
    assert not torch.equal(kw["prompt_embeds"][0], kw["prompt_embeds"][1])
    assert torch.equal(kw["negative_prompt_embeds"][0], kw["negative_prompt_embeds"][3])  # the null entry
    out = pipe(**kw, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (4, 16, 4)  # packed 2x2 latents
    imgs = digits_images(pipe, out)
    assert imgs.shape == (4, 1, 8, 8) and imgs.dtype == torch.float32
    assert 0 <= imgs.min() and imgs.max() <= 1
    assert torch.equal(digits_images(pipe, out.images), imgs) and torch.equal(digits_images(pipe, (out.images,)), imgs)
    # no guidance: no negative inputs, so one transformer call per step
    kw1 = digits_inputs(pipe, torch.tensor([5, 6]), true_cfg_scale=1.0)
    assert torch.equal(kw1["prompt_embeds"], digits_inputs(pipe, np.array([5, 6]))["prompt_embeds"])
    assert "negative_prompt_embeds" not in kw1 and "true_cfg_scale" not in kw1


def test_calls_per_step_and_cache_contexts(pipe, monkeypatch):
    seen = []
    original = pipe.transformer.cache_context

    def recording(name, **kwargs):
        seen.append(name)
        return original(name, **kwargs)

    monkeypatch.setattr(pipe.transformer, "cache_context", recording)
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        _run(pipe, [1, 2], steps=3)
        assert seen == ["cond", "uncond"] * 3 and len(calls) == 6  # true CFG: two calls per step
        seen.clear(), calls.clear()
        _run(pipe, [1, 2], steps=3, true_cfg_scale=1.0)
        assert seen == ["cond"] * 3 and len(calls) == 3
    finally:
        handle.remove()


def test_deterministic_with_fixed_generator(pipe):
    a = _run(pipe, [3, 7], steps=4, seed=5)
    b = _run(pipe, [3, 7], steps=4, seed=5)
    c = _run(pipe, [3, 7], steps=4, seed=6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_bad_arguments_name_the_argument(pipe, tmp_path):
    with pytest.raises(ValueError, match=r"name must be one of 'flux', 'latte', got 'sd3'"):
        load_digits_pipeline("sd3")
    with pytest.raises(ValueError, match="name"):
        load_digits_pipeline(3)
    for bad in ([10], [-1], [], [1.0], [True], torch.tensor([0.5]), torch.zeros(2, 2, dtype=torch.long), 7):
        with pytest.raises(ValueError, match="labels"):
            digits_inputs(pipe, bad)
    with pytest.raises(ValueError, match="true_cfg_scale"):
        digits_inputs(pipe, [1], true_cfg_scale=0.5)
    with pytest.raises(ValueError, match="pipe"):
        digits_inputs(object(), [1])
    # a damaged copy of the package data: the error names the file and the tensor
    src = arena_flux.arena_dir("flux")
    for f in (arena_flux.CONFIG_FILE, arena_flux.WEIGHTS_FILE, arena_flux.SCHEDULER_FILE, arena_flux.ARENA_JSON):
        shutil.copyfile(src.joinpath(f), tmp_path / f)
    from safetensors.torch import save_file

    save_file({"prompt_embeds": torch.zeros(11, arena_flux.TEXT_TOKENS, 64)}, str(tmp_path / arena_flux.LABELS_FILE))
    with pytest.raises(ValueError, match=r"labels.safetensors: missing tensor 'pooled_prompt_embeds'"):
        load_digits_pipeline("flux", data_dir=tmp_path)


def test_small_sample_class_accuracy(pipe):
    from omnicache.metrics import class_accuracy
    from omnicache.runtime.default import load_classifier

    labels = torch.arange(20) % 10
    imgs = _run(pipe, labels, steps=10, seed=1)
    assert class_accuracy(load_classifier(), imgs * 2 - 1, labels) >= 0.8


def test_diffusers_first_block_cache_runs_on_the_pipeline(pipe):
    from diffusers import FirstBlockCacheConfig

    ref = _run(pipe, [0, 4, 8], steps=6)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=10.0))  # reuse after the first step
    try:
        cached = _run(pipe, [0, 4, 8], steps=6)
    finally:
        pipe.transformer.disable_cache()
    assert cached.shape == ref.shape and torch.isfinite(cached).all()
    assert not torch.equal(cached, ref)  # the hook was active
    assert torch.equal(_run(pipe, [0, 4, 8], steps=6), ref)  # and is gone after disable_cache


def test_train_command_writes_what_the_loader_reads(tmp_path, capsys):
    from omnicache.cli import main

    out = tmp_path / "flux"
    args = ["--steps", "2", "--batch-size", "4", "--eval-samples", "2", "--eval-steps", "2", "--out", str(out)]
    assert main(["train-arena", "flux", *args]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([arena_flux.ARENA_JSON, arena_flux.CONFIG_FILE, arena_flux.LABELS_FILE,
                            arena_flux.SCHEDULER_FILE, arena_flux.WEIGHTS_FILE])  # no temporary files left
    p = load_digits_pipeline("flux", data_dir=out)
    assert digits_images(p, p(**digits_inputs(p, [1]), num_inference_steps=2)).shape == (1, 1, 8, 8)
    training = p.omnicache_arena.record["training"]
    assert training["args"]["steps"] == 2
    assert training["command"] == "omnicache train-arena " + shlex.join(["flux", *args])
    with pytest.raises(SystemExit):
        main(["train-arena", "sd3", "--out", str(out)])
    assert "name must be one of flux, latte" in capsys.readouterr().err


def test_train_per_arena_defaults_and_min_snr_checks(monkeypatch, capsys):
    """Latte trains Min-SNR-5 weighted and ships guidance 4 unless told otherwise; Flux's
    rectified-flow loss has no SNR weighting, so --min-snr is refused there, by name. The
    same on the command line and in the settings a Python caller gives the trainer."""
    from omnicache.arena import train
    from omnicache.cli import main

    asked = []  # what the command hands the trainer (nothing is trained here)
    monkeypatch.setattr(train, "train", lambda settings, command=None: asked.append(settings))
    assert main(["train-arena", "latte"]) == 0 and main(["train-arena", "flux"]) == 0
    latte, flux = asked
    assert latte == train.ArenaTrainingSettings("latte") and flux == train.ArenaTrainingSettings("flux")
    assert (latte.min_snr, latte.guidance, latte.steps) == (5.0, 4.0, 9000)
    assert (flux.min_snr, flux.guidance, flux.steps) == (0.0, 2.0, 1800)
    assert main(["train-arena", "latte", "--min-snr", "0", "--guidance", "2"]) == 0 and asked[-1].min_snr == 0.0
    assert train.ArenaTrainingSettings("latte", min_snr=0, guidance=2).min_snr == 0.0
    for argv in (["flux", "--min-snr", "5"], ["latte", "--min-snr", "-1"]):
        with pytest.raises(SystemExit):
            main(["train-arena", *argv])
        assert "--min-snr must be >= 0" in capsys.readouterr().err
        with pytest.raises(ValueError, match="min_snr must be >= 0"):
            train.ArenaTrainingSettings(argv[0], min_snr=float(argv[2]))
    assert len(asked) == 3  # a refused command trains nothing
