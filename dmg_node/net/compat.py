"""Which pynetdicom this node's patches of pynetdicom internals were written and tested for.

The fast path (:mod:`dmg_node.net.reactor`, :mod:`dmg_node.net.store_rsp`,
:mod:`dmg_node.net.admission`) and the input guards (:mod:`dmg_node.net.pdu_reader`,
:mod:`dmg_node.net.dimse_guard`) replace private parts of pynetdicom 3.0 (the acceptor reactor,
the DUL's PDU reader and idle check, the DIMSE message assembly). pyproject allows any
pynetdicom below 4, whose private parts may differ: on another version the node runs stock
pynetdicom and says so at start-up (``pynetdicom_untested``). :class:`dmg_node.net.gate.GatedServer`
uses only socketserver's public hook and applies on every version.
"""

from __future__ import annotations

import importlib.metadata

#: Version prefixes the patches were written and tested for (tests/test_hostile.py runs both paths).
TESTED_PREFIXES = ("3.0.",)


def pynetdicom_version() -> str:
    """The installed pynetdicom's version, from its distribution metadata."""
    return importlib.metadata.version("pynetdicom")


def patches_supported(version: str) -> bool:
    """Whether the patches of pynetdicom internals were written and tested for *version*."""
    return version.startswith(TESTED_PREFIXES)
