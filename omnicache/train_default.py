"""Trains the embedded default model on scikit-learn's digits and writes it as package data.

Two models, both on the same fixed train split (the held-out split is never trained on):

1. a class-conditional DiT (rectified flow: ``x_t = (1 - t) x0 + t eps``, target
   ``v = eps - x0``, logit-normal ``t``, class dropout for classifier-free guidance,
   AdamW with warmup and cosine decay, EMA weights saved);
2. a compact CNN digit classifier, for the class-accuracy metric.

Writes ``default_dit.safetensors`` (EMA, float16), ``digit_classifier.safetensors`` and
``default_model.json`` to ``out_dir`` and prints the classifier's held-out accuracy and
the class accuracy of guided uncached samples for both samplers.

    omnicache train-default --steps 1200 --threads 1 --out-dir omnicache/data

or, from Python, ``train(DefaultTrainingSettings(steps=1200, threads=1))``.
Deterministic given the seed and the number of CPU threads.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from .io import atomic_path, atomic_write_text
from .metrics import class_accuracy
from .runtime.default import (DEFAULT_JSON, FORMAT_VERSION, HELDOUT_FRACTION, SPLIT_SEED, DigitClassifier,
                              digits_split, load_classifier, load_default)
from .runtime.model import DiT, DiTConfig
from .runtime.samplers import sample

DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "data"


@dataclasses.dataclass(frozen=True)
class DefaultTrainingSettings:
    """What :func:`train` does (``omnicache train-default`` takes the same options, with
    dashes). Checked on construction: a bad value raises ``ValueError`` naming the field."""

    steps: int = 1200  # DiT optimisation steps
    seed: int = 0
    out_dir: Path = DEFAULT_OUT_DIR  # where the three files are written
    device: str = "cpu"
    threads: int = 0  # torch CPU threads (0: torch's default)
    batch_size: int = 256
    lr: float = 1e-3
    warmup: int = 100
    ema: float = 0.998
    hidden_size: int = 128
    depth: int = 8
    num_heads: int = 4
    shift_prob: float = 0.0  # probability of a 1-px shift per DiT sample
    classifier_steps: int = 1500
    classifier_width: int = 32
    guidance: float = 2.0  # the default classifier-free guidance scale shipped with the model
    sample_steps: int = 50  # sampling steps of the evaluation (and the shipped default)
    eval_samples: int = 500  # samples per sampler for the class accuracy

    def __post_init__(self):
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        for name in ("steps", "batch_size", "classifier_steps", "sample_steps", "eval_samples"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


def random_shift(x, generator, max_shift=1, prob=1.0):
    """Shifts each image by up to ``max_shift`` pixels (background -1 fills in)."""
    B, _, H, W = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (B,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (B,), generator=generator)
    keep = torch.rand(B, generator=generator) >= prob
    dy[keep], dx[keep] = max_shift, max_shift
    rows = (dy[:, None] + torch.arange(H)[None])[:, None, :, None].expand(B, 1, H, W + 2 * max_shift)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(W)[None])[:, None, None, :].expand(B, 1, H, W)
    return out.gather(3, cols)


def lr_at(step, steps, lr, warmup, floor=0.1):
    """The learning rate at ``step`` of ``steps``: linear warmup over ``warmup`` steps to
    ``lr``, then cosine decay to ``floor * lr`` (the default model decays to 0.1, the
    arenas, :mod:`omnicache.arena.train`, to 0.05)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (floor + (1 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_dit(config, x, y, settings, generator, device):
    model = DiT(config).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0, betas=(0.9, 0.99))
    model.train()
    losses = []
    bar = tqdm(range(settings.steps), desc="dit", mininterval=2.0)
    for step in bar:
        idx = torch.randint(0, len(y), (settings.batch_size,), generator=generator)
        x0, labels = x[idx], y[idx]
        if settings.shift_prob > 0:
            x0 = random_shift(x0, generator, prob=settings.shift_prob)
        eps = torch.randn(x0.shape, generator=generator)
        t = torch.sigmoid(torch.randn(len(idx), generator=generator))  # logit-normal(0, 1)
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
        x0, labels, eps, t, xt = (v.to(device) for v in (x0, labels, eps, t, xt))
        loss = F.mse_loss(model(xt, t, labels), eps - x0)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, settings.steps, settings.lr, settings.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(settings.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    return ema, losses


def train_classifier(x, y, settings, generator, device):
    model = DigitClassifier(num_classes=10, width=settings.classifier_width).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    model.train()
    for _ in tqdm(range(settings.classifier_steps), desc="classifier", mininterval=2.0):
        idx = torch.randint(0, len(y), (128,), generator=generator)
        xb = random_shift(x[idx], generator, prob=0.5)
        # Mild noise so that slightly imperfect generated digits are judged by shape.
        xb = (xb + 0.1 * torch.randn(xb.shape, generator=generator)).clamp(-1, 1)
        loss = F.cross_entropy(model(xb.to(device)), y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def sample_accuracy(model, classifier, sampler, guidance, n, steps, device, seed=1234):
    labels = torch.arange(n, device=device) % model.config.num_classes
    images = sample(model, labels, steps, sampler=sampler, guidance=guidance, seed=seed).clamp(-1, 1)
    return class_accuracy(classifier, images, labels)


def train(settings: DefaultTrainingSettings, command: str | None = None) -> dict:
    """Trains the DiT and the classifier as ``settings`` says, writes them with
    ``default_model.json`` to ``settings.out_dir``, evaluates what was written and returns
    that record. ``command``: how the run was asked for, kept in the record (default: this
    call, with its settings)."""
    if command is None:
        command = f"{__name__}.train({settings!r})"
    device = torch.device(settings.device)
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    x_train, y_train, x_held, y_held = digits_split()
    config = DiTConfig(
        input_size=8,
        patch_size=2,
        in_channels=1,
        hidden_size=settings.hidden_size,
        depth=settings.depth,
        num_heads=settings.num_heads,
        num_classes=10,
        class_dropout_prob=0.1,
    )
    print(f"train {len(y_train)} / held-out {len(y_held)} digits; torch threads {torch.get_num_threads()}")

    start = time.time()
    classifier = train_classifier(x_train, y_train, settings, generator, device)
    classifier_time = time.time() - start
    heldout_acc = class_accuracy(classifier, x_held.to(device), y_held.to(device))
    print(f"classifier held-out accuracy {heldout_acc:.4f} ({classifier_time:.0f} s)")

    start = time.time()
    ema, losses = train_dit(config, x_train, y_train, settings, generator, device)
    dit_time = time.time() - start
    final_loss = sum(losses[-100:]) / len(losses[-100:])
    print(f"dit final loss {final_loss:.4f} ({dit_time:.0f} s)")

    settings.out_dir.mkdir(parents=True, exist_ok=True)
    dit_state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in ema.state_dict().items()}
    with atomic_path(settings.out_dir / "default_dit.safetensors") as tmp:
        save_file(dit_state, tmp, metadata={"format": "omnicache-dit"})
    cls_state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in classifier.state_dict().items()}
    with atomic_path(settings.out_dir / "digit_classifier.safetensors") as tmp:
        save_file(cls_state, tmp, metadata={"format": "omnicache-digits"})
    info = {
        "format_version": FORMAT_VERSION,
        "description": "class-conditional rectified-flow DiT on scikit-learn digits (1x8x8 in [-1, 1], 10 classes)",
        "dit": {
            "weights": "default_dit.safetensors",
            "storage_dtype": "float16",
            "config": dataclasses.asdict(config),
            "parameters": sum(p.numel() for p in ema.parameters()),
        },
        "classifier": {
            "weights": "digit_classifier.safetensors",
            "num_classes": 10,
            "width": settings.classifier_width,
            "heldout_accuracy": heldout_acc,
            "heldout_size": len(y_held),
            "train_steps": settings.classifier_steps,
        },
        "data": {
            "source": "sklearn.datasets.load_digits",
            "scaling": "pixel / 8 - 1",
            "split": f"train_test_split(test_size={HELDOUT_FRACTION}, random_state={SPLIT_SEED}, stratify=y)",
            "train_size": len(y_train),
        },
        "default_guidance": settings.guidance,
        "default_steps": settings.sample_steps,
        "training": {
            "command": command,
            "args": {k: v for k, v in dataclasses.asdict(settings).items() if k != "out_dir"},
            "steps": settings.steps,
            "batch_size": settings.batch_size,
            "seed": settings.seed,
            "objective": "rectified flow, v = eps - x0, logit-normal t",
            "wall_time_s": round(dit_time + classifier_time, 1),
            "dit_wall_time_s": round(dit_time, 1),
            "device": str(device),
            "num_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
            "final_loss": final_loss,
            "date": datetime.date.today().isoformat(),
        },
    }
    atomic_write_text(settings.out_dir / DEFAULT_JSON, json.dumps(info, indent=2) + "\n")

    # Evaluate what was written (float16 weights as loaded by load_default).
    model = load_default(device=device, data_dir=settings.out_dir)
    classifier = load_classifier(device=device, data_dir=settings.out_dir)
    steps, guidance = settings.sample_steps, settings.guidance
    info["sample_accuracy"] = {"samples": settings.eval_samples, "steps": steps, "guidance": guidance}
    for name in ("flow", "ddim"):
        acc = sample_accuracy(model, classifier, name, guidance, settings.eval_samples, steps, device)
        info["sample_accuracy"][name] = acc
        print(f"class accuracy of guided samples ({name}, {steps} steps, g={guidance}): {acc:.4f}")
    atomic_write_text(settings.out_dir / DEFAULT_JSON, json.dumps(info, indent=2) + "\n")
    return info
