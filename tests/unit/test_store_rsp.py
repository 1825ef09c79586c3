"""Success C-STORE responses encoded by hand are the bytes pynetdicom would send (PS3.7 9.3.1.2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import MRImageStorage
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from dmg_node.net.store_rsp import _fast_command, success_command
from tests.support import LOCALHOST, running_receiver, write_series


def _rsp(message_id: int, sop_instance: str, status: int = 0x0000, **extra: Any) -> C_STORE:
    p = C_STORE()
    p.MessageID = message_id
    p.MessageIDBeingRespondedTo = message_id
    p.AffectedSOPClassUID = MRImageStorage
    p.AffectedSOPInstanceUID = sop_instance
    p.Status = status
    for k, v in extra.items():
        setattr(p, k, v)
    return p


def _pynetdicom_bytes(p: C_STORE) -> bytes:
    msg = C_STORE_RSP()
    msg.primitive_to_message(p)
    return bytes(encode(msg.command_set, True, True))


@pytest.mark.parametrize(("message_id", "uid"), [(1, "1.2.3.4"), (65535, "1.2.826.0.1.3680043.8.498.12"),
                                                 (300, "2.25.98765432109876543210987654321098765")])
def test_success_command_equals_pynetdicom(message_id: int, uid: str) -> None:
    """Odd and even UID lengths and the largest message ID encode exactly as pynetdicom does."""
    assert success_command(message_id, MRImageStorage, uid) == _pynetdicom_bytes(_rsp(message_id, uid))


def test_only_plain_success_takes_the_fast_path() -> None:
    """Failure statuses, comments and requests go through pynetdicom."""
    assert _fast_command(_rsp(3, "1.2.3")) is not None
    assert _fast_command(_rsp(3, "1.2.3", status=0xA700)) is None
    assert _fast_command(_rsp(3, "1.2.3", ErrorComment="disk full")) is None
    request = C_STORE()
    request.MessageID = 3
    request.AffectedSOPClassUID = MRImageStorage
    request.AffectedSOPInstanceUID = "1.2.3"
    assert _fast_command(request) is None


@pytest.mark.network
def test_peer_with_a_small_pdu_and_failure_statuses_still_get_answers(tmp_path: Path) -> None:
    """A requestor offering a 4 KB maximum PDU gets Success; a C-STORE the SCP refuses gets its status."""
    [path] = write_series(tmp_path / "in", 1)
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(MRImageStorage)
    ae.maximum_pdu_size = 4096
    seen: list[int] = []
    with running_receiver(tmp_path / "spool", min_free_mb=0) as rx:
        assoc = ae.associate(LOCALHOST, rx.port, ae_title="DMG_NODE",
                             evt_handlers=[(evt.EVT_DIMSE_RECV, lambda e: seen.append(e.message.command_set.Status))])
        ds = dcmread(path)
        assert assoc.send_c_store(ds).Status == 0x0000
        del ds.SeriesInstanceUID
        assert assoc.send_c_store(ds).Status == 0xC001
        assoc.release()
    assert seen == [0x0000, 0xC001]
