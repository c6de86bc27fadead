"""The scoring/compaction core: pure tensor code shared by every model family.

No model library is imported here. Reduction methods build a :class:`Plan`; the per-forward
:class:`TokenState` applies it to tokens, sizes and sources.
"""

from .attention import combine_masks, size_bias
from .plan import Plan, identity_source
from .state import TokenState

__all__ = ["Plan", "TokenState", "combine_masks", "identity_source", "size_bias"]
