"""Any model by declaration (``omnicache.integrations.diffusers.register``): a DiT written here as
plain ``nn.Module``s, with its own names (``layers``, ``x``, ``cond``), gets every policy, the
calibration included; a declaration that does not fit the model is refused at ``register``
or at ``enable`` with the field named, and the model is left as it was."""

import math

import pytest
import torch
from torch import nn

from omnicache.integrations import diffusers as oc
from omnicache.integrations.diffusers import models
from omnicache.integrations.diffusers.models import BlockIO, ModelSpec
from omnicache.plan import CachePlan
from omnicache.policies import FirstBlockCacheConfig, FORAConfig, OmniCacheConfig, TaylorSeerConfig, TeaCacheConfig

STEPS, D = 6, 32

pytestmark = pytest.mark.usefixtures("one_thread")


class Modulate(nn.Module):
    """LayerNorm, then shift and scale from the conditioning: the modulated input."""

    def __init__(self, d):
        super().__init__()
        self.norm, self.ada = nn.LayerNorm(d, elementwise_affine=False), nn.Linear(d, 2 * d)

    def forward(self, x, cond):
        shift, scale = self.ada(cond).unsqueeze(1).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class SelfAttention(nn.Module):
    def __init__(self, d, heads=2):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), -1) @ v
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """adaLN-Zero-like DiT block over ``x`` (tokens) conditioned on ``cond``; gates after each branch."""

    def __init__(self, d):
        super().__init__()
        self.mod1, self.mod2 = Modulate(d), Modulate(d)
        self.attn = SelfAttention(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.gates = nn.Linear(d, 2 * d)

    def forward(self, x, cond):
        g1, g2 = self.gates(cond).unsqueeze(1).chunk(2, dim=-1)
        x = x + g1 * self.attn(self.mod1(x, cond))
        x = x + g2 * self.mlp(self.mod2(x, cond))
        return x


class MyDiT(nn.Module):
    """Patch tokens in, a timestep embedding, a stack of ``layers``, tokens out."""

    def __init__(self, d=D, depth=4, channels=4):
        super().__init__()
        self.embed, self.t_embed = nn.Linear(channels, d), nn.Sequential(nn.Linear(16, d), nn.SiLU(), nn.Linear(d, d))
        self.layers = nn.ModuleList(Block(d) for _ in range(depth))
        self.out = nn.Linear(d, channels)

    def forward(self, x, t):
        freqs = torch.exp(-math.log(1000.0) * torch.arange(8) / 8)
        cond = self.t_embed(torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], -1))
        h = self.embed(x)
        for blk in self.layers:
            h = blk(h, cond)
        return self.out(h)


SPEC = ModelSpec(("layers",), norm1="mod1")
IO = BlockIO(args=(("hidden_states", "x"),), attn=("attn",), mlp=("mlp",), batched=("x", "cond"))


@pytest.fixture
def registry():
    """The model table as it was, after the test."""
    saved = dict(models.MODELS), dict(models.BLOCKS), set(models._CHECKED)
    yield
    for table, old in zip((models.MODELS, models.BLOCKS, models._CHECKED), saved):
        table.clear()
        table.update(old)


def _model(seed=0):
    torch.manual_seed(seed)
    m = MyDiT().eval()
    with torch.no_grad():
        for p in m.parameters():  # gates away from zero: every block moves the tokens
            p.add_(0.05 * torch.randn_like(p))
    return m


def _sample(m, x=None, steps=STEPS):
    x = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(0)) if x is None else x
    outs = []
    for i in range(steps):
        with torch.no_grad():
            out = m(x, torch.full((x.shape[0],), 1.0 - i / steps))
        outs.append(out)
        x = x - out / steps
    return outs


def _linear_calls(m, fn):
    count = []
    handles = [mod.register_forward_hook(lambda *a: count.append(1)) for mod in m.layers.modules()
               if isinstance(mod, nn.Linear)]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return len(count)


def test_registered_dit_gets_every_policy_and_calibrates(registry):
    oc.register(MyDiT, SPEC, blocks={Block: IO})
    m = _model()
    ref = _sample(m)
    full = _linear_calls(m, lambda: _sample(m))

    oc.enable(m, CachePlan.full(STEPS, 4, "block"), steps=STEPS)  # all compute: bitwise uncached
    assert all(torch.equal(a, b) for a, b in zip(_sample(m), ref))
    oc.disable(m)
    assert "forward" not in vars(m) and all("forward" not in vars(b) for b in m.modules())

    for config, granularity in ((FORAConfig(interval=2), "branch"), (TaylorSeerConfig(interval=2), "step")):
        oc.enable(m, config, steps=STEPS)
        calls = _linear_calls(m, lambda: _sample(m))
        s = oc.summary(m)
        oc.disable(m)
        assert s.granularity == granularity and s.compute_fraction < 1
        assert calls < full

    for config in (FirstBlockCacheConfig, TeaCacheConfig):  # dynamic: block 0's residual / mod1's output
        oc.enable(m, config(threshold=0.0), steps=STEPS)
        _sample(m)
        rel = sorted(d["signal_rel_l1"] for d in oc.summary(m).contexts[None]["stats"][1:])
        oc.disable(m)
        oc.enable(m, config(threshold=rel[len(rel) // 2] + 1e-7), steps=STEPS, per_sample=True)
        _sample(m)
        dec = [d["compute"] for d in oc.summary(m).contexts[None]["stats"]]
        oc.disable(m)
        assert 0 < sum(map(sum, dec)) < 2 * STEPS

    plan = oc.calibrate(m, OmniCacheConfig(compute_fraction=0.5), run=lambda: _sample(m), steps=STEPS,
                        progress=False)
    assert plan.meta["model"]["class"] == "MyDiT"
    oc.enable(m, plan)
    outs = _sample(m)
    s = oc.summary(m)
    oc.disable(m)
    assert abs(s.contexts[None]["block_fraction"] - 0.5) <= 0.05
    err = max((a - b).abs().max().item() for a, b in zip(outs, ref))
    assert 0 < err < max(r.abs().max().item() for r in ref)
    assert all(torch.equal(a, b) for a, b in zip(_sample(m), ref))  # disabled: as before


class TwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(D, D)

    def forward(self, x, cond):
        return x + self.attn(x), cond


class OneOut(TwoOut):
    def forward(self, x, cond):
        y = x + self.attn(x)
        return y


class Wrapper(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.blocks = nn.ModuleList([block])

    def forward(self, x, t):
        return self.blocks[0](x, t)


def test_a_declaration_that_does_not_fit_is_refused_with_the_field_named(registry):
    with pytest.raises(ValueError, match=r"BlockIO.returns of Block: Block.forward takes no 'hidden_states'.*"
                                         r"BlockIO.args"):
        oc.register(MyDiT, SPEC, blocks={Block: BlockIO()})  # the stream is called x
    with pytest.raises(ValueError, match=r"BlockIO.returns of TwoOut: 1 name\(s\).*returns 2 value"):
        oc.register("Wrapper", ModelSpec(("blocks",)), blocks={TwoOut: BlockIO(args=(("hidden_states", "x"),))})
    with pytest.raises(ValueError, match=r"BlockIO.returns of OneOut: 2 name\(s\).*returns 1 value"):
        oc.register("Wrapper", ModelSpec(("blocks",)), blocks={OneOut: BlockIO(
            returns=("encoder_hidden_states", "hidden_states"), args=(("hidden_states", "x"), ("encoder_hidden_states",
                                                                                              "cond")))})
    with pytest.raises(ValueError, match=r"BlockIO.batched of Block: Block.forward takes no 'temb'"):
        oc.register(MyDiT, SPEC, blocks={Block: BlockIO(args=(("hidden_states", "x"),), batched=("x", "temb"))})
    with pytest.raises(ValueError, match=r"BlockIO.cached must hold 'hidden_states'"):
        BlockIO(returns=("x",))
    with pytest.raises(ValueError, match=r"ModelSpec.blocks must be a non-empty tuple"):
        ModelSpec("layers")
    assert "MyDiT" not in oc.MODELS and "Block" not in oc.BLOCKS  # nothing half-registered
    with pytest.raises(ValueError, match=r"FluxTransformer2DModel is already supported; pass replace=True"):
        oc.register("FluxTransformer2DModel", SPEC)

    m = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cases = [  # (spec, blocks, policy, the error); Block undeclared first, then declared
        (SPEC, {}, FORAConfig(interval=2), r"block class Block of MyDiT is not supported"),
        (ModelSpec(("blocks",)), {Block: IO}, FORAConfig(interval=2), r"ModelSpec.blocks\[0\] of MyDiT: MyDiT.blocks"),
        (SPEC, {Block: BlockIO(args=(("hidden_states", "x"),), attn=("attention",), mlp=("mlp",))},
         FORAConfig(interval=2), r"BlockIO.attn of Block: the block has no submodule 'attention'"),
        (ModelSpec(("layers",), norm1="norm1"), {Block: IO}, TeaCacheConfig(threshold=0.1),
         r"TeaCacheConfig needs the model's modulated input.*'norm1', which block 0 does not have"),
        (ModelSpec(("layers",), norm1=None), {Block: IO}, TeaCacheConfig(threshold=0.1),
         r"TeaCacheConfig needs the model's modulated input.*declares none"),
    ]
    for spec, blocks, config, message in cases:
        oc.register(MyDiT, spec, blocks=blocks, replace=True)
        with pytest.raises((TypeError, ValueError), match=message):
            oc.enable(m, config, steps=STEPS)
        assert not hasattr(m, oc._ATTR) and "forward" not in vars(m)
        assert all("forward" not in vars(b) for b in m.modules()) and not m._forward_hooks
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    oc.register(MyDiT, SPEC, blocks={Block: IO}, replace=True)
    oc.enable(m, FORAConfig(interval=2), steps=STEPS)  # the right declaration: enabled
    oc.disable(m)
