"""A minimal Diffusion Transformer (DiT), after facebookresearch/DiT ``models.py``.

The model predicts the rectified-flow velocity ``v = eps - x0`` for
``x_t = (1 - t) x0 + t eps`` with ``t`` in ``[0, 1]`` (``t = 1`` is pure noise); see
``omnicache.runtime.samplers``. Output channels equal input channels (no learned sigma).

The block loop is split so that a cache executor can drive it piece by piece::

    h, c = model.embed(x, t, y)                 # (B, T, D), (B, D)
    for blk in model.blocks:
        mod = blk.modulation(c)                 # 6 x (B, D)
        h = h + mod[2].unsqueeze(1) * blk.attn_branch(h, mod)
        h = h + mod[5].unsqueeze(1) * blk.mlp_branch(h, mod)
    out = model.final(h, c)                     # (B, C, H, W)

Everything here compiles with ``torch.compile(fullgraph=True)``: no control flow on
tensor values.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "DiTConfig",
    "DiT",
    "DiTBlock",
    "PRESETS",
    "DiT_tiny",
    "DiT_S_2",
    "DiT_B_2",
    "DiT_L_2",
    "DiT_XL_2",
    "make_dit",
]


@dataclass(frozen=True)
class DiTConfig:
    input_size: int = 32  # latent height = width
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # class id `num_classes` is the null class (CFG)
    class_dropout_prob: float = 0.1

    def __post_init__(self):
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"DiTConfig.{name} must be a positive int, got {value!r}")
        if self.input_size % self.patch_size:
            raise ValueError(
                f"DiTConfig.input_size ({self.input_size}) must be divisible by patch_size ({self.patch_size})"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"DiTConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.hidden_size % 4:
            raise ValueError(
                f"DiTConfig.hidden_size must be divisible by 4 (2-D sin-cos embedding), got {self.hidden_size}"
            )
        if not isinstance(self.mlp_ratio, (int, float)) or isinstance(self.mlp_ratio, bool) \
                or not math.isfinite(self.mlp_ratio) or self.mlp_ratio <= 0:
            raise ValueError(f"DiTConfig.mlp_ratio must be a finite positive number, got {self.mlp_ratio!r}")
        if self.mlp_hidden < 1:
            raise ValueError(f"DiTConfig.mlp_ratio ({self.mlp_ratio!r}) times hidden_size ({self.hidden_size}) "
                             f"must give an MLP width >= 1, got {self.mlp_hidden}")
        if not isinstance(self.class_dropout_prob, (int, float)) or isinstance(self.class_dropout_prob, bool) \
                or not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"DiTConfig.class_dropout_prob must be in [0, 1), got {self.class_dropout_prob!r}")

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


def modulate(x, shift, scale):
    # x (B, T, D), shift/scale (B, D)
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#               Embedding layers for timesteps and class labels                 #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Embeds flow time ``t`` in [0, 1] (scaled by 1000) into a D-vector."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """Sinusoidal embedding ``[cos(t f_k), sin(t f_k)]``, ``f_k = max_period^(-k/half)``."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # (B, half)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        t_freq = self.timestep_embedding(t.float() * 1000.0, self.frequency_embedding_size)  # (B, F)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Embeds class labels; label ``num_classes`` is the null class for classifier-free guidance.

    In training, each label is replaced by the null class with probability ``dropout_prob``.
    """

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels):
        drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels):
        if self.training and self.dropout_prob > 0:
            labels = self.token_drop(labels)
        return self.embedding_table(labels)  # (B, D)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x):
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads)  # (B, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, Dh)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, Dh)
        x = x.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning.

    ``forward(h, c)`` is exactly::

        mod = modulation(c)
        h = h + gate_msa * attn_branch(h, mod)
        h = h + gate_mlp * mlp_branch(h, mod)

    where the branches return PRE-gate outputs so a cache can store them and apply the
    current step's gate.
    """

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def modulation(self, c):
        """``c`` (B, D) -> (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), each (B, D)."""
        return self.adaLN_modulation(c).chunk(6, dim=1)

    def attn_branch(self, h, mod):
        """Pre-gate attention output ``attn(modulate(norm1(h), shift_msa, scale_msa))``, (B, T, D)."""
        return self.attn(modulate(self.norm1(h), mod[0], mod[1]))

    def mlp_branch(self, h, mod):
        """Pre-gate MLP output ``mlp(modulate(norm2(h), shift_mlp, scale_mlp))``, (B, T, D)."""
        return self.mlp(modulate(self.norm2(h), mod[3], mod[4]))

    def forward(self, h, c):
        mod = self.modulation(c)
        h = h + mod[2].unsqueeze(1) * self.attn_branch(h, mod)  # (B, T, D)
        h = h + mod[5].unsqueeze(1) * self.mlp_branch(h, mod)  # (B, T, D)
        return h


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (B, D)
        x = modulate(self.norm_final(x), shift, scale)  # (B, T, D)
        return self.linear(x)  # (B, T, p * p * C)


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone, predicting the flow velocity."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        D, p, C = config.hidden_size, config.patch_size, config.in_channels
        self.x_embedder = nn.Conv2d(C, D, kernel_size=p, stride=p, bias=True)  # patchify
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(config.num_classes, D, config.class_dropout_prob)
        grid = config.input_size // p
        # Fixed sin-cos embedding; a buffer outside the state dict (recomputed at init).
        self.register_buffer("pos_embed", get_2d_sincos_pos_embed(D, grid)[None], persistent=False)  # (1, T, D)
        self.blocks = nn.ModuleList(
            [DiTBlock(D, config.num_heads, mlp_ratio=config.mlp_ratio) for _ in range(config.depth)]
        )
        self.final_layer = FinalLayer(D, p, C)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        # Patch embedding like nn.Linear (instead of nn.Conv2d).
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output as zero.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        """(B, T, p * p * C) -> (B, C, H, W)."""
        C, p = self.config.in_channels, self.config.patch_size
        g = self.config.input_size // p
        x = x.reshape(x.shape[0], g, g, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], C, g * p, g * p)

    def patchify(self, x):
        """The patch embedding (the Conv2d's weights) as one matmul on ``(B, T, C*p*p)``
        patches: same result as the convolution, and ``h`` comes out contiguous."""
        B, C, H, W = x.shape
        p = self.config.patch_size
        patches = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(B, (H // p) * (W // p), C * p * p)  # (B, T, C*p*p)
        w = self.x_embedder.weight
        return F.linear(patches, w.reshape(w.shape[0], -1), self.x_embedder.bias)

    def embed(self, x, t, y):
        """x (B, C, H, W), t (B,) flow time in [0, 1], y (B,) long -> h (B, T, D), c (B, D)."""
        h = self.patchify(x) + self.pos_embed.to(x.dtype)  # (B, T, D), contiguous
        c = self.t_embedder(t).to(h.dtype) + self.y_embedder(y)  # (B, D)
        return h, c

    def final(self, h, c):
        """h (B, T, D), c (B, D) -> velocity (B, C, H, W)."""
        return self.unpatchify(self.final_layer(h, c))

    def forward(self, x, t, y):
        """Velocity ``v = eps - x0`` for x (B, C, H, W), t (B,) in [0, 1], y (B,) long."""
        h, c = self.embed(x, t, y)
        for blk in self.blocks:
            h = blk(h, c)
        return self.final(h, c)

    def flops_per_sample(self) -> dict:
        """Analytic forward FLOPs for one sample (one row of the batch).

        A multiply-add counts 2 FLOPs. Counted: every matmul (``2 * in * out`` per row),
        the two attention matmuls (``QK^T`` and ``AV``: ``2 * T^2 * D`` each) and each
        adaLN ``modulate`` (one multiply-add per element, ``2 * T * D``). Not counted:
        layer norms, softmax, activations, bias adds, gated residual adds (all O(T * D)).
        Per sample means per model input: classifier-free guidance doubles the batch.
        """
        cfg = self.config
        T, D, M = cfg.num_tokens, cfg.hidden_size, cfg.mlp_hidden
        patch_dim = cfg.patch_size**2 * cfg.in_channels
        freq = self.t_embedder.frequency_embedding_size
        embed = 2 * T * patch_dim * D + 2 * (freq * D + D * D)
        block_modulation = 2 * D * 6 * D
        block_attn = 2 * T * D + 2 * T * D * 3 * D + 2 * 2 * T * T * D + 2 * T * D * D
        block_mlp = 2 * T * D + 2 * T * D * M + 2 * T * M * D
        final = 2 * D * 2 * D + 2 * T * D + 2 * T * D * patch_dim
        total = embed + cfg.depth * (block_modulation + block_attn + block_mlp) + final
        return {
            "embed": embed,
            "block_attn": block_attn,
            "block_mlp": block_mlp,
            "block_modulation": block_modulation,
            "final": final,
            "total": total,
        }


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################
# https://github.com/facebookresearch/mae/blob/main/util/pos_embed.py


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """Returns (grid_size * grid_size, embed_dim) float32, as in DiT/MAE."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    # As the original: np.meshgrid(grid_w, grid_h); the first half embeds grid[0], the second grid[1].
    grid = torch.meshgrid(coords, coords, indexing="xy")  # 2 x (g, g)
    emb_0 = get_1d_sincos_pos_embed(embed_dim // 2, grid[0].reshape(-1))  # (T, D/2)
    emb_1 = get_1d_sincos_pos_embed(embed_dim // 2, grid[1].reshape(-1))  # (T, D/2)
    return torch.cat([emb_0, emb_1], dim=1).float()  # (T, D)


def get_1d_sincos_pos_embed(embed_dim, pos):
    """pos (M,) -> (M, embed_dim): [sin(pos * w_k), cos(pos * w_k)], w_k = 10000^(-2k/embed_dim)."""
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    out = pos[:, None] * omega[None]  # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, D)


#################################################################################
#                                   DiT Configs                                 #
#################################################################################


def _preset(depth, hidden_size, num_heads, *, input_size, in_channels, num_classes, **kw):
    cfg = DiTConfig(
        input_size=input_size,
        patch_size=kw.pop("patch_size", 2),
        in_channels=in_channels,
        hidden_size=hidden_size,
        depth=depth,
        num_heads=num_heads,
        num_classes=num_classes,
        **kw,
    )
    return DiT(cfg)


def DiT_tiny(*, input_size=8, in_channels=1, num_classes=10, **kw):
    return _preset(2, 32, 2, input_size=input_size, in_channels=in_channels, num_classes=num_classes, **kw)


def DiT_S_2(*, input_size=32, in_channels=4, num_classes=1000, **kw):
    return _preset(12, 384, 6, input_size=input_size, in_channels=in_channels, num_classes=num_classes, **kw)


def DiT_B_2(*, input_size=32, in_channels=4, num_classes=1000, **kw):
    return _preset(12, 768, 12, input_size=input_size, in_channels=in_channels, num_classes=num_classes, **kw)


def DiT_L_2(*, input_size=32, in_channels=4, num_classes=1000, **kw):
    return _preset(24, 1024, 16, input_size=input_size, in_channels=in_channels, num_classes=num_classes, **kw)


def DiT_XL_2(*, input_size=32, in_channels=4, num_classes=1000, **kw):
    return _preset(28, 1152, 16, input_size=input_size, in_channels=in_channels, num_classes=num_classes, **kw)


PRESETS = {"tiny": DiT_tiny, "S/2": DiT_S_2, "B/2": DiT_B_2, "L/2": DiT_L_2, "XL/2": DiT_XL_2}


def make_dit(name: str, **overrides) -> DiT:
    """Builds a preset by name (``tiny``, ``S/2``, ``B/2``, ``L/2``, ``XL/2``) with keyword overrides."""
    if name not in PRESETS:
        raise ValueError(f"preset name must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name](**overrides)
