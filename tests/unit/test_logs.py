"""Log set-up: no patient data reaches the log through library warnings."""

from __future__ import annotations

import io
import json
import warnings

import structlog

from dmg_node import logs


def test_a_pydicom_warning_never_carries_the_value_it_quotes() -> None:
    """pydicom's "Invalid value for VR PN: 'DOE^JANE'" is logged with the value withheld."""
    stream = io.StringIO()
    with warnings.catch_warnings():  # restores showwarning, which configure() replaces
        warnings.simplefilter("always")
        logs.configure("info", "json", include_phi=False, stream=stream)
        try:
            warnings.warn("Invalid value for VR PN: 'DOE^JANE'. Please see <link> for allowed values.", UserWarning,
                          stacklevel=1)
        finally:
            structlog.reset_defaults()
    [line] = [json.loads(x) for x in stream.getvalue().splitlines() if "python_warning" in x]
    assert "DOE^JANE" not in json.dumps(line) and "VR PN: <value withheld>" in line["message"]


def test_redact_warning_keeps_text_without_a_quoted_value() -> None:
    """Warnings that quote no element value pass unchanged."""
    assert logs.redact_warning("The value length (7) exceeds the maximum") == "The value length (7) exceeds the maximum"
    assert logs.redact_warning('Invalid value for VR LO: "ID123"') == "Invalid value for VR LO: <value withheld>"
