"""Shared fixtures: every test starts with structlog's default configuration."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """CLI tests configure structlog globally (level, stream); undo it so later tests see every event."""
    yield
    structlog.reset_defaults()
