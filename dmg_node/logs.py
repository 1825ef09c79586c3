"""structlog set-up: JSON lines (or console), contextvars, and the PHI filter.

Every module logs through ``structlog.get_logger(__name__)`` with snake_case event names and
key-value fields. Admins tail the JSON lines (``journalctl -o cat | jq``); see docs/logging.md.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import warnings
from collections import deque
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, TextIO

import structlog
from pynetdicom import _config as pynetdicom_config

# Fields that may carry patient identity (PS3.15 Annex E basic profile, the ones a log could
# plausibly pick up). They are dropped unless an admin sets logging.include_phi = true.
PHI_KEYS = frozenset(
    {
        "patient_name",
        "patient_id",
        "patient_birth_date",
        "patients_name",
        "patients_birth_date",
        "other_patient_ids",
        "patient_address",
        "accession_number",
    }
)

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


# pydicom's warnings quote the offending value ("Invalid value for VR PN: 'DOE^JANE'"), which may be
# a patient's name or ID.
_QUOTED = re.compile(r"""(['"]).*?\1""")


def drop_phi(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Remove patient-identifying fields from an event, and quoted values from Python warnings
    (a structlog processor)."""
    for key in PHI_KEYS.intersection(event_dict):
        del event_dict[key]
    if event_dict.get("event") == "python_warning" and isinstance(event_dict.get("message"), str):
        event_dict["message"] = _QUOTED.sub(r"\1...\1", event_dict["message"])
    return event_dict


class RecentWarnings:
    """Keep the last *size* warning and error events for the status page (a structlog processor).

    It runs after the PHI filter, so it holds what the log holds; values are shortened.
    """

    def __init__(self, size: int = 100) -> None:
        self._events: deque[dict[str, str]] = deque(maxlen=size)
        self._lock = threading.Lock()

    def __call__(self, _logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if method in ("warning", "error", "exception", "critical"):
            item = {k: str(v)[:300] for k, v in event_dict.items()}
            with self._lock:
                self._events.append(item)
        return event_dict

    def clear(self) -> None:
        with self._lock:
            self._events.clear()

    def events(self) -> list[dict[str, str]]:
        """Newest first."""
        with self._lock:
            return list(reversed(self._events))


#: The process's recent warnings and errors (shown by the web status page).
RECENT_WARNINGS = RecentWarnings()


def _warning_to_log(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    file: TextIO | None = None, line: str | None = None) -> None:
    structlog.get_logger("py.warnings").warning(
        "python_warning", category=category.__name__, message=str(message)[:500], module=Path(filename).name,
        line=lineno)


def configure(level: str = "info", fmt: str = "json", include_phi: bool = False, stream: TextIO | None = None) -> None:
    """Configure structlog for the whole process.

    Parameters
    ----------
    level
        Minimum level: debug, info, warning or error.
    fmt
        ``json`` (one JSON object per line, the default) or ``console`` (readable, coloured off).
    include_phi
        Keep patient name/ID/birth date fields when a caller logs them (off by default).
    stream
        Where lines go; standard output by default (journald captures it under systemd).
    """
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
    ]
    if not include_phi:
        processors.append(drop_phi)
    processors.append(RECENT_WARNINGS)
    processors.append(structlog.processors.format_exc_info)
    if fmt == "console":
        processors.append(structlog.dev.ConsoleRenderer(colors=False))
    else:
        processors.append(structlog.processors.JSONRenderer(sort_keys=False, default=str))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stdout),
        cache_logger_on_first_use=False,
    )
    # Python warnings (pydicom's about odd values, say) become log events, not plain-text lines
    # in the middle of the JSON stream.
    warnings.showwarning = _warning_to_log
    # pynetdicom logs through the stdlib; keep its chatter at warning and below ours.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING if level != "debug" else logging.INFO)
    # Its "standard" handlers format a dump of every PDU and DIMSE message for that log even when
    # nothing is printed (+3 % images/s without them, measured on tmpfs): bind them only at debug
    # level (pynetdicom reads this when an association is created).
    pynetdicom_config.LOG_HANDLER_LEVEL = "standard" if level == "debug" else "none"
