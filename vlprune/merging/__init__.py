"""Matching algorithms that produce core Plans (bipartite ToMe merging)."""

from .bipartite import bipartite_soft_matching, max_merge

__all__ = ["bipartite_soft_matching", "max_merge"]
