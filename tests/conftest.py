"""Shared fixtures: every test starts with structlog's default configuration."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """CLI tests configure structlog (and warnings) globally; undo it so later tests see every event."""
    showwarning = warnings.showwarning
    yield
    structlog.reset_defaults()
    warnings.showwarning = showwarning
