"""The DiT runtime model: shapes, the block-loop interface the cache executor drives,
FLOP counting, presets and torch.compile."""

import math

import pytest
import torch

from omnicache.runtime.model import PRESETS, DiT, DiTConfig, TimestepEmbedder, get_2d_sincos_pos_embed, make_dit


def tiny(**kw):
    torch.manual_seed(0)
    model = make_dit("tiny", **kw)
    # adaLN-Zero starts every block as the identity; randomise so the tests see real blocks.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def inputs(model, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, cfg.num_classes + 1, (batch,), generator=g)  # includes the null class
    return x, t, y


def test_tiny_shapes():
    model = tiny()
    cfg = model.config
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size, cfg.input_size) == (2, 32, 2, 2, 8)
    x, t, y = inputs(model)
    h, c = model.embed(x, t, y)
    assert h.shape == (3, cfg.num_tokens, cfg.hidden_size) == (3, 16, 32)
    assert c.shape == (3, 32)
    mod = model.blocks[0].modulation(c)
    assert len(mod) == 6 and all(m.shape == (3, 32) for m in mod)
    assert model.blocks[0].attn_branch(h, mod).shape == h.shape
    assert model.blocks[0].mlp_branch(h, mod).shape == h.shape
    out = model(x, t, y)
    assert out.shape == x.shape and out.dtype == torch.float32


@pytest.mark.parametrize("input_size,in_channels", [(8, 1), (16, 4), (12, 3)])
def test_forward_equals_manual_block_loop(input_size, in_channels):
    model = tiny(input_size=input_size, in_channels=in_channels)
    x, t, y = inputs(model, batch=2)
    with torch.no_grad():
        ref = model(x, t, y)
        h, c = model.embed(x, t, y)
        for blk in model.blocks:
            mod = blk.modulation(c)
            h = h + mod[2].unsqueeze(1) * blk.attn_branch(h, mod)
            h = h + mod[5].unsqueeze(1) * blk.mlp_branch(h, mod)
        out = model.final(h, c)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_unpatchify_inverts_patchify_layout():
    model = tiny(input_size=8, in_channels=3)
    p, g, C = 2, 4, 3
    x = torch.arange(2 * C * 8 * 8, dtype=torch.float32).reshape(2, C, 8, 8)
    # Token (i, j) holds patch (i, j) flattened as (p, q, c).
    tokens = x.reshape(2, C, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(2, g * g, p * p * C)
    torch.testing.assert_close(model.unpatchify(tokens), x)


def test_fresh_model_is_adaln_zero():
    torch.manual_seed(0)
    model = make_dit("tiny").eval()
    x, t, y = inputs(model)
    h, c = model.embed(x, t, y)
    for blk in model.blocks:
        torch.testing.assert_close(blk(h, c), h)
    assert torch.count_nonzero(model(x, t, y)) == 0


def test_class_dropout_only_in_training():
    model = tiny(class_dropout_prob=0.5)
    y = torch.arange(10).repeat(20)
    emb = model.y_embedder
    torch.testing.assert_close(emb(y), emb.embedding_table(y))  # eval: no drop
    emb.train()
    torch.manual_seed(0)
    dropped = emb.token_drop(y)
    share = (dropped == 10).float().mean().item()
    assert 0.35 < share < 0.65
    assert torch.equal(dropped[dropped != 10], y[dropped != 10])


def test_timestep_embedding_scale():
    t = torch.tensor([0.0, 0.5, 1.0])
    e = TimestepEmbedder.timestep_embedding(t * 1000, 8)
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    torch.testing.assert_close(e[:, :4], torch.cos(t[:, None] * 1000 * freqs))
    torch.testing.assert_close(e[:, 4:], torch.sin(t[:, None] * 1000 * freqs))


def test_pos_embed_matches_reference_formula():
    D, g = 16, 3
    pe = get_2d_sincos_pos_embed(D, g)
    assert pe.shape == (g * g, D)
    omega = 1.0 / 10000 ** (torch.arange(D // 4, dtype=torch.float64) / (D / 4))
    for token in range(g * g):
        i, j = divmod(token, g)  # row, column
        ref = torch.cat([torch.sin(j * omega), torch.cos(j * omega), torch.sin(i * omega), torch.cos(i * omega)])
        torch.testing.assert_close(pe[token].double(), ref, rtol=0, atol=1e-6)


def test_flops_per_sample():
    model = tiny()
    cfg = model.config
    f = model.flops_per_sample()
    assert set(f) == {"embed", "block_attn", "block_mlp", "block_modulation", "final", "total"}
    assert all(isinstance(v, int) and v > 0 for v in f.values())
    per_block = f["block_attn"] + f["block_mlp"] + f["block_modulation"]
    assert f["total"] == f["embed"] + cfg.depth * per_block + f["final"]
    T, D = cfg.num_tokens, cfg.hidden_size
    # Block matmuls dominate: attention ~ 8 T D^2 + 4 T^2 D, MLP ~ 16 T D^2 (mlp_ratio 4).
    assert f["block_mlp"] == 2 * T * D + 16 * T * D * D
    assert f["block_attn"] == 2 * T * D + 8 * T * D * D + 4 * T * T * D
    # Matmul FLOPs = 2 x parameters of the weight matrices touched per token / per sample.
    blk = model.blocks[0]
    per_token = sum(m.weight.numel() for m in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2))
    assert f["block_attn"] + f["block_mlp"] == 2 * T * per_token + 4 * T * T * D + 4 * T * D
    assert f["block_modulation"] == 2 * blk.adaLN_modulation[1].weight.numel()


def test_flops_xl2_matches_known_size():
    # DiT-XL/2 at 256 px (32x32 latent): 118.6 "Gflops" in the DiT paper, which counts a
    # multiply-add once; we count it as 2 FLOPs.
    model_flops = DiT.flops_per_sample(_Shell(PRESETS_CONFIG["XL/2"]))
    assert 2 * 118.0e9 < model_flops["total"] < 2 * 119.2e9


class _Shell:
    """Enough of a DiT to call flops_per_sample without allocating XL/2 weights."""

    def __init__(self, config):
        self.config = config
        self.t_embedder = type("T", (), {"frequency_embedding_size": 256})()


PRESETS_CONFIG = {
    "S/2": DiTConfig(input_size=32, patch_size=2, in_channels=4, hidden_size=384, depth=12, num_heads=6),
    "B/2": DiTConfig(input_size=32, patch_size=2, in_channels=4, hidden_size=768, depth=12, num_heads=12),
    "L/2": DiTConfig(input_size=32, patch_size=2, in_channels=4, hidden_size=1024, depth=24, num_heads=16),
    "XL/2": DiTConfig(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16),
}


@pytest.mark.parametrize("name", ["S/2", "B/2", "L/2", "XL/2"])
def test_presets_have_original_sizes(name, monkeypatch):
    # Build the preset's config without allocating its weights.
    captured = {}
    monkeypatch.setattr("omnicache.runtime.model.DiT", lambda cfg: captured.setdefault("cfg", cfg))
    PRESETS[name]()
    cfg = captured["cfg"]
    assert cfg == PRESETS_CONFIG[name]
    assert (cfg.num_classes, cfg.mlp_ratio, cfg.class_dropout_prob) == (1000, 4.0, 0.1)


def test_preset_overrides_and_bad_names():
    model = make_dit("tiny", input_size=4, in_channels=2, num_classes=3)
    assert (model.config.input_size, model.config.in_channels, model.config.num_classes) == (4, 2, 3)
    with pytest.raises(ValueError, match="preset name"):
        make_dit("XXL/2")
    with pytest.raises(ValueError, match="input_size"):
        DiTConfig(input_size=7, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=2)
    with pytest.raises(ValueError, match="num_heads"):
        DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=3, num_classes=2)
    with pytest.raises(ValueError, match="depth"):
        DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=0, num_heads=2, num_classes=2)


def test_state_dict_has_no_pos_embed():
    # The fixed positional embedding is recomputed, not stored with the weights.
    assert "pos_embed" not in tiny().state_dict()


def test_compile_fullgraph_equals_eager():
    torch._dynamo.reset()
    model = tiny()
    x, t, y = inputs(model, batch=2)
    with torch.no_grad():
        eager = model(x, t, y)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x, t, y)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_block_pieces():
    torch._dynamo.reset()
    model = tiny()
    x, t, y = inputs(model, batch=2)

    def manual(x, t, y):
        h, c = model.embed(x, t, y)
        for blk in model.blocks:
            mod = blk.modulation(c)
            h = h + mod[2].unsqueeze(1) * blk.attn_branch(h, mod)
            h = h + mod[5].unsqueeze(1) * blk.mlp_branch(h, mod)
        return model.final(h, c)

    with torch.no_grad():
        torch.testing.assert_close(
            torch.compile(manual, fullgraph=True, backend="aot_eager")(x, t, y), model(x, t, y), rtol=1e-5, atol=1e-5
        )
