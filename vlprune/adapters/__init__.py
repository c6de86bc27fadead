"""Model-family adapters: where the reduction points are and how to patch them reversibly.

Each adapter module imports its model library lazily; importing this package registers them.
"""

from . import hf_bert, hf_clip, llava, open_clip, qwen_vl, timm_vit  # noqa: F401  (importing registers the adapters)
from .base import UnsupportedModelError, supported_text

__all__ = ["UnsupportedModelError", "supported_text"]
