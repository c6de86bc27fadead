"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    """The shared folder of real weights and images, from ``$VLPRUNE_ASSETS``."""
    root = os.environ.get("VLPRUNE_ASSETS")
    if not root:
        pytest.skip("set VLPRUNE_ASSETS to the shared assets folder")
    path = Path(root)
    if not path.is_dir():
        pytest.fail(f"VLPRUNE_ASSETS={root} is not a folder")
    return path
