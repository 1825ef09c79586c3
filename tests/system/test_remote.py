"""The node's side of ``[inference] backend = "ray"`` without Ray: the wire format, how each answer of
the Serve application maps to an error, and the job that waits while inference is away.

A small HTTP server on 127.0.0.1 plays the Serve application (tests/test_ray.py runs the real one).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dmg_node import config
from dmg_node.config import InferenceBackend, InferenceSettings
from dmg_node.errors import ConfigError, InferenceUnavailable, SeriesError
from dmg_node.segment.remote import (
    MODEL_HEADER,
    VERSION_HEADER,
    RayModel,
    decode_mask,
    decode_volume,
    encode_mask,
    encode_volume,
)
from dmg_node.volume import Volume
from tests.support import (
    LOCALHOST,
    free_port,
    running_node,
    running_storescp,
    storescu,
    write_series,
)

Handler = Callable[[http.server.BaseHTTPRequestHandler, bytes], None]


def _volume(shape: tuple[int, int, int] = (4, 8, 6)) -> Volume:
    affine = np.diag([0.9, 0.9, 4.0, 1.0])
    affine[:3, 3] = (-10.0, 5.0, 2.0)
    return Volume(array=np.random.default_rng(0).normal(size=shape).astype(np.float32), affine=affine,
                  series_instance_uid="1.2.3", frame_of_reference_uid="1.2.4",
                  sop_instance_uids=tuple(f"1.2.5.{i}" for i in range(shape[0])), sop_class_uid="1.2.840.10008.5.1.4.1.1.4")


@contextlib.contextmanager
def fake_serve(handler: Handler, port: int | None = None) -> Iterator[int]:
    """An HTTP server on 127.0.0.1 that answers every POST with *handler*; stopped on exit."""

    class _Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            handler(self, self.rfile.read(int(self.headers["Content-Length"])))

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer((LOCALHOST, port or free_port()), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _answer(status: int, body: bytes, headers: dict[str, str] | None = None) -> Handler:
    def handle(h: http.server.BaseHTTPRequestHandler, _data: bytes) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return handle


def _block_mask(h: http.server.BaseHTTPRequestHandler, data: bytes) -> None:
    """Answer a mask with a 3 x 24 x 24 voxel block in the middle of the received volume."""
    shape = decode_volume(data).array.shape
    mask = np.zeros(shape, dtype=bool)
    c = [n // 2 for n in shape]
    mask[c[0] - 1:c[0] + 2, c[1] - 12:c[1] + 12, c[2] - 12:c[2] + 12] = True
    _answer(200, encode_mask(mask), {MODEL_HEADER: "fake-t2", VERSION_HEADER: "9.9"})(h, data)


def _model(port: int, timeout: float = 10.0) -> RayModel:
    return RayModel(InferenceSettings(backend=InferenceBackend.RAY, url=f"http://{LOCALHOST}:{port}",
                                      timeout_seconds=timeout), "t2", ("demo-t2-3d", "demo-t2"))


def test_volume_and_mask_cross_the_wire_unchanged() -> None:
    """Voxels and affine survive encoding exactly; a mask comes back bit for bit; no UIDs are sent."""
    v = _volume()
    back = decode_volume(encode_volume(v))
    assert np.array_equal(back.array, v.array) and np.array_equal(back.affine, v.affine)
    assert back.spacing == v.spacing and back.series_instance_uid == ""
    assert b"1.2.3" not in encode_volume(v)
    mask = np.random.default_rng(1).random((5, 7, 9)) > 0.5
    assert np.array_equal(decode_mask(encode_mask(mask)), mask)
    with pytest.raises(SeriesError):
        decode_volume(b"not an npz")


def test_inference_settings_default_to_local_and_check_the_url() -> None:
    """[inference] is local by default; a ray backend needs an http(s) URL of the Serve proxy."""
    assert config.from_dict({}).inference.backend is InferenceBackend.LOCAL
    s = config.from_dict({"inference": {"backend": "ray", "url": "https://gpu.example.org:8443", "num_gpus": 0.25}})
    assert s.inference.backend is InferenceBackend.RAY and s.inference.num_gpus == 0.25
    with pytest.raises(ConfigError, match="inference.url"):
        config.from_dict({"inference": {"backend": "ray", "url": "gpu.example.org:8000"}})
    with pytest.raises(ConfigError, match="inference.backend"):
        config.from_dict({"inference": {"backend": "grpc"}})


def test_each_answer_of_the_service_maps_to_a_result_or_a_typed_error() -> None:
    """200: the mask and the serving model's name and version; 422: SeriesError (not retried);
    5xx, nothing listening or no answer in time: InferenceUnavailable (retried)."""
    v = _volume((6, 40, 40))
    with fake_serve(_block_mask) as port:
        model = _model(port)
        assert (model.name, model.version) == ("demo-t2-3d+demo-t2", "remote")
        assert model.predict(v).sum() == 3 * 24 * 24
        assert (model.name, model.version) == ("fake-t2", "9.9")
    with fake_serve(_answer(422, b"no t2 model is meant for a series of 9.00 mm voxel spacing")) as port:
        with pytest.raises(SeriesError, match="9.00 mm"):
            _model(port).predict(v)
    with fake_serve(_answer(503, b"none of the model folders is deployed")) as port:
        with pytest.raises(InferenceUnavailable, match="503"):
            _model(port).predict(v)
    with pytest.raises(InferenceUnavailable):
        _model(free_port()).predict(v)

    def slow(h: http.server.BaseHTTPRequestHandler, data: bytes) -> None:
        time.sleep(2)
        _block_mask(h, data)

    with fake_serve(slow) as port:
        with pytest.raises(InferenceUnavailable):
            _model(port, timeout=0.5).predict(v)


@pytest.mark.network
def test_job_waits_while_inference_is_away_then_completes_once(tmp_path: Path) -> None:
    """Nothing answers at inference.url: the node keeps receiving, the job waits past max_attempts
    without failing (status says why), and once the service answers one RTSTRUCT is sent."""
    serve_port = free_port()
    series, other = tmp_path / "series", tmp_path / "other"
    write_series(series, 12, rows=64, cols=64, description="T2 TSE AX")
    write_series(other, 12, rows=64, cols=64, description="T2 TSE AX", seed=7)  # another study
    with running_storescp(tmp_path / "tps", "TPS") as (_tps, tps_port), \
            running_node(tmp_path / "node", assembly={"quiet_seconds": 0.5, "max_attempts": 2},
                         inference={"backend": "ray", "url": f"http://{LOCALHOST}:{serve_port}",
                                    "retry_initial_seconds": 0.2, "retry_max_seconds": 0.5},
                         rtstruct={"min_volume_mm3": 0},
                         destinations=[{"name": "tps", "ae_title": "TPS", "host": LOCALHOST, "port": tps_port}]) as node:
        r = storescu(node.port, series)
        assert r.returncode == 0, r.stderr
        node.wait_event("inference_unavailable", timeout=60, consecutive_failures=4)
        r = storescu(node.port, other)  # still receiving
        assert r.returncode == 0, r.stderr
        out = subprocess.run([sys.executable, "-m", "dmg_node.cli", "status", "--json", "--config",
                              str(node.config_path)], capture_output=True, text=True, timeout=60, check=True)
        report = json.loads(out.stdout)
        assert report["node"]["inference"]["available"] is False
        assert all(j["state"] in ("pending", "running") and j["attempts"] <= 1 for j in report["jobs"])
        text = subprocess.run([sys.executable, "-m", "dmg_node.cli", "status", "--config", str(node.config_path)],
                              capture_output=True, text=True, timeout=60, check=True).stdout
        assert "inference (ray) unavailable" in text
        with fake_serve(_block_mask, port=serve_port):
            node.wait_event("inference_available", timeout=60)
            deadline = time.monotonic() + 60
            while [e["event"] for e in node.events()].count("rtstruct_sent") < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1)  # anything sent twice would arrive now
        received = list((tmp_path / "tps").glob("RS.*"))
    events = [e["event"] for e in node.events()]
    assert "job_failed" not in events
    assert len(received) == events.count("rtstruct_sent") == events.count("job_done") == 2  # one per study
