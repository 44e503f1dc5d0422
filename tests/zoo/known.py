"""The 12 classes of tests/diffusers_models.py, as zoo cases."""

import diffusers_models as dm

from . import Case


def _case(fn):
    def make():
        m, shape, inputs = fn()
        return Case(m, shape, inputs)
    return make


ZOO = {"DiTTransformer2DModel": _case(dm.dit), "PixArtTransformer2DModel": _case(dm.pixart),
       "FluxTransformer2DModel": _case(dm.flux), "SD3Transformer2DModel": _case(dm.sd3),
       "WanTransformer3DModel": _case(dm.wan), "CogVideoXTransformer3DModel": _case(dm.cogvideox),
       "LatteTransformer3DModel": _case(dm.latte), "HunyuanVideoTransformer3DModel": _case(dm.hunyuan_video),
       "LTXVideoTransformer3DModel": _case(dm.ltx_video), "QwenImageTransformer2DModel": _case(dm.qwen_image),
       "SanaTransformer2DModel": _case(dm.sana), "Lumina2Transformer2DModel": _case(dm.lumina2)}
