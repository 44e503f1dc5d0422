"""OmniCache: fused-kernel feature caching for Diffusion Transformers.

``omnicache.ops`` holds the fused cache ops (also usable alone by other engines).
"""

from . import ops

__version__ = "0.1.0"
