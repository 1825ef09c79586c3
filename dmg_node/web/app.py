"""The Starlette app: GET-only views of the spool, the node's live status and its recent warnings.

Routes: ``/`` (the HTML page), ``/api/status`` (the same snapshot as JSON), ``/overlay/{id}.png``
(an outbox RTSTRUCT's contour on its series), ``/metrics`` (Prometheus text format) and
``/healthz``. The app only calls the spool's read queries; any other method is answered 405 by
Starlette. Patient name and ID appear only when ``include_phi()`` is true (logging.include_phi).
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog
from pydicom import dcmread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from dmg_node import __version__
from dmg_node.errors import DmgNodeError
from dmg_node import metrics
from dmg_node.web.page import render_page
from dmg_node.web.render import overlay_png_from_files

log = structlog.get_logger(__name__)

STALE_SECONDS = 10.0  # the node rewrites its status file every second
OVERLAY_CACHE = 64  # rendered PNGs kept (an outbox file never changes once written)
LIMIT = 50


class SpoolView(Protocol):
    """The read-only queries of :class:`dmg_node.storage.spool.Spool` that the pages use."""

    def summary(self) -> list[dict[str, Any]]: ...

    def jobs(self, limit: int = 50) -> list[dict[str, Any]]: ...

    def outbox(self, limit: int = 50) -> list[dict[str, Any]]: ...

    def state_counts(self) -> dict[str, dict[str, int]]: ...

    def free_bytes(self) -> int: ...

    def outbox_source(self, item_id: int) -> tuple[Path, str, str] | None: ...

    def series_files(self, study_uid: str) -> dict[str, list[Path]]: ...


@dataclass(frozen=True)
class Sources:
    """Where the app reads from; all read-only.

    Parameters
    ----------
    spool
        The spool's queries.
    status_path
        The node's ``node-status.json`` (rewritten every second while it runs), or None.
    include_phi
        Whether patient name and ID may be shown (read per request: follows a config reload).
    warnings
        The recent warning and error log events, newest first.
    """

    spool: SpoolView
    status_path: Path | None
    include_phi: Callable[[], bool]
    warnings: Callable[[], list[dict[str, str]]]


def read_status(path: Path | None, now: float) -> dict[str, Any] | None:
    """The node's live status, with ``stale`` set when its heartbeat is older than :data:`STALE_SECONDS`."""
    if path is None:
        return None
    try:
        live: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if now - float(live.get("updated_at", 0)) > STALE_SECONDS:
        live["stale"] = True
    return live


def _patient(spool: SpoolView, study_uid: str) -> str:
    """Patient name and ID from the first file of a study (only called when PHI may be shown)."""
    for paths in spool.series_files(study_uid).values():
        try:
            ds = dcmread(paths[0], stop_before_pixels=True, specific_tags=["PatientName", "PatientID"])
        except (OSError, ValueError):
            continue
        return f"{ds.get('PatientName', '')} ({ds.get('PatientID', '')})"
    return ""


def snapshot(src: Sources, now: float) -> dict[str, Any]:
    """Everything the page shows, as plain JSON-able values (PHI only when ``include_phi()``)."""
    spool = src.spool
    phi = src.include_phi()
    studies = list(reversed(spool.summary()))[:LIMIT]  # newest first
    labels = {se["series_instance_uid"]: se["label"] for s in studies for se in s["series"]}
    if phi:
        for s in studies:
            s["patient"] = _patient(spool, s["study_instance_uid"])
    outbox = spool.outbox(LIMIT)
    contours: dict[str, dict[str, Any]] = {}
    for o in outbox:
        c = contours.get(o["sop_instance_uid"])
        if c is None:
            source = spool.outbox_source(int(o["id"]))
            if source is None:
                continue
            c = contours[o["sop_instance_uid"]] = {
                "id": o["id"], "sop_instance_uid": o["sop_instance_uid"], "study_instance_uid": source[1],
                "source_series_uid": source[2], "label": labels.get(source[2]), "destinations": ""}
        c["id"] = min(c["id"], o["id"])
        c["destinations"] = ", ".join(filter(None, [f"{o['destination']}: {o['state']}", c["destinations"]]))
    counts = spool.state_counts()
    return {
        "now": now, "version": __version__, "include_phi": phi, "node": read_status(src.status_path, now),
        "health": {"free_bytes": spool.free_bytes(), "jobs": counts["jobs"], "outbox": counts["outbox"]},
        "studies": studies, "jobs": spool.jobs(LIMIT), "outbox": outbox, "contours": list(contours.values()),
        "warnings": src.warnings()[:LIMIT],
    }


class _OverlayCache:
    """Rendered PNGs by outbox item id (bounded, thread-safe: sync routes run in a thread pool)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[int, tuple[bytes, list[int]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: int) -> tuple[bytes, list[int]] | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
            return self._items.get(key)

    def put(self, key: int, value: tuple[bytes, list[int]]) -> None:
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)


def build_app(src: Sources) -> Starlette:
    """The status app over *src*; see the module docstring for its routes."""
    cache = _OverlayCache(OVERLAY_CACHE)
    scrape = metrics.ScrapeCollector(src.spool, lambda: read_status(src.status_path, time.time()))

    def page(_request: Request) -> Response:
        return HTMLResponse(render_page(snapshot(src, time.time())), headers={"Cache-Control": "no-store"})

    def api_status(_request: Request) -> Response:
        return JSONResponse(snapshot(src, time.time()))

    def overlay(request: Request) -> Response:
        item_id = int(request.path_params["item_id"])
        hit = cache.get(item_id)
        if hit is None:
            source = src.spool.outbox_source(item_id)
            files = src.spool.series_files(source[1]).get(source[2]) if source is not None else None
            if source is None or not files:
                return PlainTextResponse("no such RTSTRUCT, or its series is no longer in the spool", status_code=404)
            try:
                hit = overlay_png_from_files(source[0], files)
            except (DmgNodeError, OSError, ValueError) as exc:
                log.warning("overlay_failed", outbox_id=item_id, error=f"{type(exc).__name__}: {exc}"[:300])
                return PlainTextResponse(f"cannot draw this contour: {type(exc).__name__}", status_code=500)
            cache.put(item_id, hit)
        png, slices = hit
        return Response(png, media_type="image/png", headers={
            "Cache-Control": "max-age=3600", "X-Slices": ",".join(str(k) for k in slices)})

    def prometheus(_request: Request) -> Response:
        return Response(metrics.exposition(scrape), media_type="text/plain; version=0.0.4; charset=utf-8")

    def healthz(_request: Request) -> Response:
        return PlainTextResponse("ok")

    return Starlette(routes=[
        Route("/", page, methods=["GET"]),
        Route("/api/status", api_status, methods=["GET"]),
        Route("/overlay/{item_id:int}.png", overlay, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ])
