"""The vocabulary of classification: labels, compiled name patterns, the result of one series.

Patterns (:data:`dmg_node.classify.patterns.DEFAULT_PATTERNS`) are compiled once, when the
settings are loaded, and matched with :meth:`re.Pattern.search` (anywhere in the name) and
``re.IGNORECASE``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from dmg_node.classify.patterns import DEFAULT_PATTERNS


class Label(StrEnum):
    """Which model a series goes to; ``none`` is not routed."""

    T1C = "t1c"
    T2 = "t2"
    FLAIR = "flair"
    NONE = "none"


@dataclass(frozen=True)
class Rules:
    """Compiled name patterns, one tuple per key of :data:`DEFAULT_PATTERNS`."""

    t1c: tuple[re.Pattern[str], ...]
    t2: tuple[re.Pattern[str], ...]
    flair: tuple[re.Pattern[str], ...]
    none: tuple[re.Pattern[str], ...]
    contrast: tuple[re.Pattern[str], ...]
    t1: tuple[re.Pattern[str], ...]

    def search(self, key: str, text: str) -> str | None:
        """Describe the first pattern of *key* that ``re.search`` finds in *text*, else ``None``.

        The description ("t2 pattern #1 matched 'T2'") counts patterns from 1 in list order.
        """
        patterns: tuple[re.Pattern[str], ...] = getattr(self, key)
        for number, pattern in enumerate(patterns, start=1):
            match = pattern.search(text)
            if match is not None:
                return f"{key} pattern #{number} matched {match.group(0)!r}"
        return None


def compile_rules(overrides: Mapping[str, Sequence[str]] | None = None) -> Rules:
    """Compile :data:`DEFAULT_PATTERNS`, with each key in *overrides* replacing that key's list.

    Parameters
    ----------
    overrides
        Key -> list of regular expressions (e.g. the ``[classify]`` table of node.toml). A key
        present here replaces the default list entirely; an empty list disables the key.

    Returns
    -------
    Rules
        Patterns compiled with ``re.IGNORECASE``, applied with ``re.search``.

    Raises
    ------
    ValueError
        A key is unknown, a value is not a list of strings, or a pattern does not compile;
        the message names the key and the pattern.
    """
    merged: dict[str, Sequence[str]] = dict(DEFAULT_PATTERNS)
    for key, patterns in (overrides or {}).items():
        if key not in DEFAULT_PATTERNS:
            raise ValueError(f"unknown classify pattern key {key!r} (known: {', '.join(DEFAULT_PATTERNS)})")
        if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
            raise ValueError(f"classify pattern key {key!r} must be a list of strings, found {patterns!r}")
        merged[key] = patterns
    compiled: dict[str, tuple[re.Pattern[str], ...]] = {}
    for key, patterns in merged.items():
        try:
            compiled[key] = tuple(re.compile(p, re.IGNORECASE) for p in patterns)
        except re.error as exc:
            raise ValueError(f"classify pattern {exc.pattern!r} for key {key!r} does not compile: {exc}") from exc
    return Rules(**compiled)


@dataclass(frozen=True)
class Classification:
    """The label of one series and why."""

    series_instance_uid: str
    label: Label
    reason: str
