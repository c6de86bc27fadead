"""Matching algorithms that produce core Plans (bipartite ToMe merging, temporal merging)."""

from .bipartite import bipartite_soft_matching, max_merge
from .temporal import TemporalResult, temporal_keep_count, temporal_merge

__all__ = ["TemporalResult", "bipartite_soft_matching", "max_merge", "temporal_keep_count",
           "temporal_merge"]
