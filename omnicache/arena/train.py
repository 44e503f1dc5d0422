"""Trains a digits arena and writes it as package data.

    omnicache train-arena flux --steps 1800 --threads 1 --seed 0

``flux``: a class-conditional ``diffusers.FluxTransformer2DModel`` (config
``FLUX_TRANSFORMER_CONFIG``) and its label table (one ``prompt_embeds`` /
``pooled_prompt_embeds`` entry per class plus a null entry), trained together with
rectified flow on the train split of scikit-learn's digits (the split of
``omnicache.train_default``: the classifier's held-out digits are never trained on),
exactly as ``FluxPipeline`` samples: packed 2x2 latents, ``img_ids``/``txt_ids``,
``timestep = sigma`` (the pipeline's ``t / 1000``), ``x_sigma = (1 - sigma) x0 + sigma
noise``, target ``noise - x0``; sigma is logit-normal, time-shifted with the pipeline's
mu for 16 tokens; 10% label dropout to the null entry (true CFG). AdamW with warmup and
cosine decay; the EMA weights are saved (float16).

    omnicache train-arena latte --steps 9000 --threads 2 --seed 0

``latte``: a class-conditional ``diffusers.LatteTransformer3DModel`` (config
``LATTE_TRANSFORMER_CONFIG``) and its label table (``prompt_embeds`` only: the class
enters through cross-attention), trained on moving digits
(:func:`omnicache.arena.latte.moving_digits`, fresh clips every step from the same train
split) with v-prediction under the DDPM betas of the arena's ``DDIMScheduler``, as
``LattePipeline`` samples, Min-SNR-5 weighted; 10% label dropout (CFG). Its accuracy is per frame: the
classifier reads each frame's 8x8 window of most ink.

Then loads what it wrote with ``load_digits_pipeline`` and records, in ``arena.json``, the
digit classifier's accuracy on uncached samples (classes in turn) at 28 and 50 steps.
Every file is written atomically (temporary file in the same folder, fsync, rename).
Deterministic given the seed and the number of threads. From Python:
``train(ArenaTrainingSettings("flux", steps=1800))``.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save as save_safetensors_bytes

from ..io import atomic_write_bytes
from ..runtime.default import digits_split
from ..train_default import lr_at
from . import flux as arena_flux
from . import latte as arena_latte
from .pipelines import ARENAS, digits_images, digits_inputs, load_digits_pipeline

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "data" / "arena"
LR_FLOOR = 0.05  # the cosine decay ends at 5% of the peak learning rate

# per-arena defaults of the settings left None
ARENA_DEFAULTS = {
    "flux": dict(steps=1800, batch_size=128, lr=1e-3, guidance=2.0, min_snr=0.0),
    "latte": dict(steps=9000, batch_size=48, lr=1e-3, guidance=4.0, min_snr=5.0),
}


@dataclasses.dataclass(frozen=True)
class ArenaTrainingSettings:
    """What :func:`train` does (``omnicache train-arena NAME`` takes the same options, with
    dashes). The settings left None take the arena's default (:data:`ARENA_DEFAULTS`).
    Checked on construction: a bad value raises ``ValueError`` naming the field."""

    name: str  # the arena to train: flux or latte
    steps: int | None = None  # optimisation steps (flux 1800, latte 9000)
    threads: int = 1  # torch CPU threads (0: torch's default)
    seed: int = 0
    out: Path | None = None  # output folder (None: the package data folder, DEFAULT_OUT / name)
    batch_size: int | None = None  # samples (clips) a step (flux 128, latte 48)
    lr: float | None = None  # peak learning rate (1e-3)
    warmup: int = 100
    ema: float = 0.998
    label_dropout: float = 0.1
    guidance: float | None = None  # shipped with the arena: Flux's true_cfg_scale 2, Latte's guidance_scale 4
    min_snr: float | None = None  # Latte: Min-SNR-gamma loss weighting (5; 0: plain v-prediction); Flux: 0
    eval_samples: int = 200  # uncached samples for the class accuracy (0: none)
    eval_steps: tuple[int, ...] = (28, 50)  # sampling steps of the evaluations
    log_every: int = 50

    def __post_init__(self):
        if self.name not in ARENAS:
            raise ValueError(f"name must be one of {', '.join(ARENAS)}, got {self.name!r}")
        for key, value in ARENA_DEFAULTS[self.name].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.out is not None:
            object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "eval_steps", tuple(self.eval_steps))
        for key in ("steps", "batch_size", "log_every"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive")
        if self.eval_samples < 0 or any(s <= 0 for s in self.eval_steps):
            raise ValueError("eval_samples must be >= 0 and eval_steps positive")
        if self.eval_samples and not self.eval_steps:
            raise ValueError("eval_steps must name at least one step count when eval_samples > 0")
        if self.guidance < 1:
            raise ValueError("guidance must be >= 1")
        if self.min_snr < 0 or (self.name == "flux" and self.min_snr):
            raise ValueError("min_snr must be >= 0 (and 0 for flux, whose rectified-flow loss has no SNR weighting)")


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


class LabelTable(torch.nn.Module):
    """The learned conditioning: one (prompt_embeds, pooled_prompt_embeds) entry per label."""

    def __init__(self, num_labels, tokens, joint_dim, pooled_dim, generator):
        super().__init__()
        self.prompt_embeds = torch.nn.Parameter(torch.randn(num_labels, tokens, joint_dim, generator=generator))
        if pooled_dim:  # Flux's pooled projection; Latte has none
            self.pooled_prompt_embeds = torch.nn.Parameter(torch.randn(num_labels, pooled_dim, generator=generator))


def flux_mu(seq_len):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = arena_flux.FLUX_SCHEDULER_CONFIG
    return calculate_shift(seq_len, c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"], c["max_shift"])


def train_flux(settings, generator):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    x_train, y_train, _, _ = digits_split()
    transformer = FluxTransformer2DModel(**arena_flux.FLUX_TRANSFORMER_CONFIG)
    cfg = transformer.config
    num_labels = arena_flux.NUM_CLASSES + 1
    dims = (arena_flux.TEXT_TOKENS, cfg.joint_attention_dim, cfg.pooled_projection_dim)
    table = LabelTable(num_labels, *dims, generator)
    modules = torch.nn.ModuleDict({"transformer": transformer, "table": table})
    ema = copy.deepcopy(modules).eval().requires_grad_(False)
    opt = torch.optim.AdamW(modules.parameters(), lr=settings.lr, weight_decay=0.0, betas=(0.9, 0.99))
    modules.train()

    side = arena_flux.LATENT_SIZE
    tokens = (side // 2) ** 2
    img_ids = FluxPipeline._prepare_latent_image_ids(1, side // 2, side // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(arena_flux.TEXT_TOKENS, 3)
    shift = math.exp(flux_mu(tokens))  # the pipeline's dynamic shift for this sequence length
    print(f"train {len(y_train)} digits; {sum(p.numel() for p in transformer.parameters())} transformer parameters;"
          f" time shift e^mu = {shift:.3f}; torch threads {torch.get_num_threads()}", flush=True)

    losses = []
    start = time.time()
    for step in range(settings.steps):
        idx = torch.randint(0, len(y_train), (settings.batch_size,), generator=generator)
        x0, labels = x_train[idx], y_train[idx].clone()
        drop = torch.rand(len(idx), generator=generator) < settings.label_dropout
        labels[drop] = arena_flux.NULL_LABEL
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.sigmoid(torch.randn(len(idx), generator=generator))  # logit-normal(0, 1)
        sigma = shift * t / (1 + (shift - 1) * t)  # = e^mu / (e^mu + (1/t - 1)), the scheduler's time_shift
        s = sigma[:, None, None, None]
        xt = (1 - s) * x0 + s * noise
        B = len(idx)
        pred = transformer(
            hidden_states=FluxPipeline._pack_latents(xt, B, 1, side, side),
            encoder_hidden_states=table.prompt_embeds[labels],
            pooled_projections=table.pooled_prompt_embeds[labels],
            timestep=sigma,
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]
        target = FluxPipeline._pack_latents(noise - x0, B, 1, side, side)
        loss = F.mse_loss(pred, target)
        _optimise(settings, step, opt, modules, ema, loss)
        losses.append(loss.item())
        _log(settings, step, losses, start)
    return ema, losses, time.time() - start


def train_latte(settings, generator):
    """Latte on moving digits: v-prediction under the arena's DDPM betas (``t`` uniform in
    0..999), the loss on the first output channel (the one ``LattePipeline`` keeps), each
    clip's weighted by Min-SNR-gamma (Hang et al., 2023: ``min(SNR, gamma) / (SNR + 1)`` for
    v-prediction, normalised by the batch's weights) unless ``min_snr`` is 0."""
    from diffusers import DDIMScheduler, LatteTransformer3DModel

    x_train, y_train, _, _ = digits_split()
    transformer = LatteTransformer3DModel(**arena_latte.LATTE_TRANSFORMER_CONFIG)
    table = LabelTable(arena_flux.NUM_CLASSES + 1, arena_flux.TEXT_TOKENS, arena_latte.CAPTION_CHANNELS, 0, generator)
    modules = torch.nn.ModuleDict({"transformer": transformer, "table": table})
    ema = copy.deepcopy(modules).eval().requires_grad_(False)
    opt = torch.optim.AdamW(modules.parameters(), lr=settings.lr, weight_decay=0.0, betas=(0.9, 0.99))
    modules.train()
    alphas = DDIMScheduler(**arena_latte.LATTE_SCHEDULER_CONFIG).alphas_cumprod.float()
    print(f"train {len(y_train)} digits as moving clips ({arena_latte.FRAMES} frames, {arena_latte.CANVAS}^2 canvas);"
          f" {sum(p.numel() for p in transformer.parameters())} transformer parameters;"
          f" torch threads {torch.get_num_threads()}", flush=True)
    losses, start = [], time.time()
    for step in range(settings.steps):
        idx = torch.randint(0, len(y_train), (settings.batch_size,), generator=generator)
        x0 = arena_latte.moving_digits(x_train[idx], generator)
        labels = y_train[idx].clone()
        labels[torch.rand(len(idx), generator=generator) < settings.label_dropout] = arena_flux.NULL_LABEL
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, len(alphas), (len(idx),), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0  # v
        pred = transformer(hidden_states=xt, timestep=t, encoder_hidden_states=table.prompt_embeds[labels],
                           return_dict=False)[0]
        per = (pred[:, :1] - target).pow(2).flatten(1).mean(1)
        if settings.min_snr:  # Min-SNR-gamma weighting for v-prediction: min(SNR, gamma) / (SNR + 1)
            snr = alphas[t] / (1 - alphas[t])
            w = snr.clamp(max=settings.min_snr) / (snr + 1)
            loss = (w * per).sum() / w.sum()
        else:
            loss = per.mean()
        _optimise(settings, step, opt, modules, ema, loss)
        losses.append(loss.item())
        _log(settings, step, losses, start)
    return ema, losses, time.time() - start


def _optimise(settings, step, opt, modules, ema, loss):
    for group in opt.param_groups:
        group["lr"] = lr_at(step, settings.steps, settings.lr, settings.warmup, floor=LR_FLOOR)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
    opt.step()
    decay = min(settings.ema, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), modules.parameters()):
            pe.lerp_(pm, 1 - decay)


def _log(settings, step, losses, start):
    if step % settings.log_every == 0 or step == settings.steps - 1:
        recent = losses[-settings.log_every :]
        print(f"step {step:5d}  loss {sum(recent) / len(recent):.4f}  {time.time() - start:7.0f} s", flush=True)


# the model class, its scheduler, and the record's description, per arena
_ARENA_FILES = {
    "flux": ("FluxTransformer2DModel", "FlowMatchEulerDiscreteScheduler", arena_flux.FLUX_SCHEDULER_CONFIG,
             "class-conditional FluxTransformer2DModel on scikit-learn digits (the 1x8x8 digit in [-1, 1] is the "
             "latent; no VAE); FluxPipeline with true CFG against the null label entry",
             "rectified flow, x = (1 - s) x0 + s noise, target noise - x0, s = time_shift(logit-normal)"),
    "latte": ("LatteTransformer3DModel", "DDIMScheduler", arena_latte.LATTE_SCHEDULER_CONFIG,
              "class-conditional LatteTransformer3DModel on moving digits (one scikit-learn digit bouncing on a "
              "16x16 canvas for 8 frames; the 1x8x16x16 clip in [-1, 1] is the latent; no VAE); class through "
              "cross-attention; LattePipeline with CFG against the null label entry",
              "v-prediction, x = sqrt(a_t) x0 + sqrt(1 - a_t) noise, target sqrt(a_t) noise - sqrt(1 - a_t) x0, "
              "t uniform in 0..999 (linear betas 1e-4..0.02), per clip weighted min(SNR, gamma) / (SNR + 1) (--min-snr gamma)"),
}


def write_arena(name, out: Path, ema, record):
    cls_name, sched_name, sched_config = _ARENA_FILES[name][:3]
    out.mkdir(parents=True, exist_ok=True)
    transformer, table = ema["transformer"], ema["table"]
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in transformer.state_dict().items()}
    atomic_write_bytes(out / arena_flux.WEIGHTS_FILE, save_safetensors_bytes(state, metadata={"format": "pt"}))
    labels = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in table.state_dict().items()}
    atomic_write_bytes(out / arena_flux.LABELS_FILE, save_safetensors_bytes(labels, metadata={"format": "omnicache-labels"}))
    config = dict(transformer.config)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config = {"_class_name": cls_name, **config}
    atomic_write_bytes(out / arena_flux.CONFIG_FILE, _json_bytes(config))
    atomic_write_bytes(out / arena_flux.SCHEDULER_FILE, _json_bytes({"_class_name": sched_name, **sched_config}))
    atomic_write_bytes(out / arena_flux.ARENA_JSON, _json_bytes(record))


def classify(pipe, classifier, images):
    """Predicted classes of ``digits_images`` output: one per image (Flux), one per frame
    (Latte: the digit's 8x8 window, :func:`omnicache.arena.latte.frame_digits`)."""
    if images.dim() == 5:
        images = arena_latte.frame_digits(images)
    param = next(classifier.parameters())
    return classifier((images * 2 - 1).to(device=param.device, dtype=param.dtype)).argmax(dim=1)  # takes [-1, 1]


@torch.no_grad()
def sample_accuracy(pipe, classifier, n, steps, guidance=None, seed=1234, chunk=100):
    """Classifier accuracy of ``n`` uncached samples (classes in turn, ``steps`` steps);
    per frame for a video arena."""
    labels = torch.arange(n) % arena_flux.NUM_CLASSES
    generator = torch.Generator().manual_seed(seed)
    hits = []
    for i in range(0, n, chunk):
        part = labels[i : i + chunk]
        out = pipe(**digits_inputs(pipe, part, guidance=guidance), num_inference_steps=steps, generator=generator)
        images = digits_images(pipe, out)
        pred = classify(pipe, classifier, images)
        hits.append(pred.view(len(part), -1) == part[:, None])
    return torch.cat(hits).float().mean().item()


def train(settings: ArenaTrainingSettings, command: str | None = None) -> dict:
    """Trains the arena ``settings.name`` as ``settings`` says, writes it (weights, label
    table, configs, ``arena.json``) to ``settings.out`` (None: ``DEFAULT_OUT / name``),
    evaluates what was written as users load it and returns the ``arena.json`` record.
    ``command``: how the run was asked for, kept in the record (default: this call, with
    its settings)."""
    if command is None:
        command = f"{__name__}.train({settings!r})"
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    out = settings.out if settings.out is not None else DEFAULT_OUT / settings.name
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)

    fit = train_flux if settings.name == "flux" else train_latte
    ema, losses, wall = fit(settings, generator)
    final_loss = sum(losses[-100:]) / len(losses[-100:])
    print(f"final loss (mean of the last 100 steps) {final_loss:.4f}; {wall:.0f} s", flush=True)
    _, _, _, description, objective = _ARENA_FILES[settings.name]
    guidance_key = "true_cfg_scale" if settings.name == "flux" else "guidance_scale"
    side = arena_flux.LATENT_SIZE if settings.name == "flux" else arena_latte.CANVAS
    record = {
        "arena": settings.name,
        "description": description,
        guidance_key: settings.guidance,
        "height": side * 8,
        "width": side * 8,
        "num_classes": arena_flux.NUM_CLASSES,
        "null_label": arena_flux.NULL_LABEL,
        "training": {
            "command": command,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()},
            "objective": objective,
            "data": "sklearn.datasets.load_digits, train split of omnicache.runtime.default.digits_split",
            "wall_time_s": round(wall, 1),
            "device": "cpu",
            "cpu": platform.processor() or platform.machine(),
            "num_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
            "diffusers_version": __import__("diffusers").__version__,
            "final_loss": final_loss,
            "date": datetime.date.today().isoformat(),
        },
    }
    if settings.name == "latte":
        record["frames"] = arena_latte.FRAMES
    write_arena(settings.name, out, ema, record)

    # Evaluate what was written, as users load it.
    from ..runtime.default import load_classifier

    pipe = load_digits_pipeline(settings.name, data_dir=out)
    classifier = load_classifier()
    per = " frames" if settings.name == "latte" else ""
    record["sample_accuracy"] = {"samples": settings.eval_samples, guidance_key: settings.guidance, "seed": 1234,
                                 "per": "frame" if per else "sample"}
    for steps in settings.eval_steps if settings.eval_samples else []:
        t0 = time.time()
        acc = sample_accuracy(pipe, classifier, settings.eval_samples, steps)
        record["sample_accuracy"][f"steps_{steps}"] = acc
        print(f"class accuracy{per}, {settings.eval_samples} uncached samples, {steps} steps,"
              f" guidance {settings.guidance}: {acc:.4f} ({time.time() - t0:.0f} s)", flush=True)
    if settings.eval_samples:
        steps = settings.eval_steps[0]
        acc1 = sample_accuracy(pipe, classifier, settings.eval_samples, steps, guidance=1.0)
        record["sample_accuracy"][f"steps_{steps}_no_guidance"] = acc1
        print(f"class accuracy{per} without guidance, {steps} steps: {acc1:.4f}", flush=True)
    sizes = {p.name: p.stat().st_size for p in sorted(Path(out).iterdir()) if not p.name.startswith(".")}
    record["files_bytes"] = sizes
    atomic_write_bytes(out / arena_flux.ARENA_JSON, _json_bytes(record))
    print(f"wrote {out}: {sum(sizes.values()) / 1e6:.2f} MB", flush=True)
    return record
