"""Series header -> (label, reason), and one series per label: which model, if any, a series goes to.

Pure: no file I/O, no clock, no logging; callers log the returned reasons.

- :mod:`.rules`: labels, the compiled name patterns (:class:`Rules`), a series' result.
- :mod:`.patterns`: the default name patterns (data, overridable in node.toml ``[classify]``).
- :mod:`.header`: the header attributes read from a pydicom Dataset (untrusted input).
- :mod:`.decide`: the decision table (header exclusions, physics, names).
- :mod:`.choose`: one series per label when a study holds several.
"""

from dmg_node.classify.choose import Choice, choose
from dmg_node.classify.decide import classify
from dmg_node.classify.header import SeriesHeader, header_from_dataset, header_from_series, series_name
from dmg_node.classify.patterns import DEFAULT_PATTERNS
from dmg_node.classify.rules import Classification, Label, Rules, compile_rules

__all__ = [
    "DEFAULT_PATTERNS", "Choice", "Classification", "Label", "Rules", "SeriesHeader", "choose", "classify",
    "compile_rules", "header_from_dataset", "header_from_series", "series_name",
]
