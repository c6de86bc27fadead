"""The scoring/compaction core: pure tensor code shared by every model family.

No model library is imported here. Scores (:mod:`.scores`) rank tokens; selection rules
(:mod:`.select`) and matching algorithms (:mod:`vlprune.merging`) turn them into a
:class:`Plan`; the per-forward :class:`TokenState` applies it to tokens, sizes and sources.
"""

from .attention import combine_masks, size_bias
from .plan import Plan, identity_source, take_tokens
from .scores import SCORE_NAMES, AttnInputs, compute_scores
from .select import keep_count, prune_plan
from .state import TokenState

__all__ = [
    "SCORE_NAMES",
    "AttnInputs",
    "Plan",
    "TokenState",
    "combine_masks",
    "compute_scores",
    "identity_source",
    "keep_count",
    "prune_plan",
    "size_bias",
    "take_tokens",
]
