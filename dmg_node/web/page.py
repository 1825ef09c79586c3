"""The status page's HTML from a snapshot of the node (pure: a dict in, a string out).

Every value from the spool or a DICOM header is escaped; nothing here knows where the data came
from. Which fields may appear (no patient identity unless ``include_phi``) is decided by
:mod:`dmg_node.web.app` when it takes the snapshot.
"""

from __future__ import annotations

import datetime
from html import escape
from typing import Any

REFRESH_SECONDS = 15

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.3em 0}td,th{padding:2px 8px;text-align:left;vertical-align:top;
border-bottom:1px solid #eee}th{background:#f3f3f3}.uid{font-family:monospace;font-size:12px}
.ok{color:#176f2c;font-weight:600}.bad{color:#b00020;font-weight:600}.warn{color:#a05a00;font-weight:600}
.note{color:#555;font-size:12px}.contour{margin:.6em 0 1.2em}.contour img{max-width:100%;border:1px solid #ccc}
"""

_STATE_CLASS = {"done": "ok", "sent": "ok", "failed": "bad", "pending": "warn", "running": "warn", "waiting": "warn"}


def when(t: float | None) -> str:
    """A Unix time as UTC ``YYYY-MM-DD HH:MM:SSZ`` ('-' for none)."""
    if t is None:
        return "-"
    return datetime.datetime.fromtimestamp(float(t), datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _cell(value: Any, css: str = "") -> str:
    text = "-" if value is None or value == "" else str(value)
    return f'<td class="{css}">{escape(text)}</td>' if css else f"<td>{escape(text)}</td>"


def _state(value: str | None) -> str:
    return _cell(value, _STATE_CLASS.get(value or "", ""))


def _table(headers: list[str], rows: list[str], empty: str) -> str:
    if not rows:
        return f'<p class="note">{escape(empty)}</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _node(snap: dict[str, Any]) -> str:
    live = snap["node"]
    health = snap["health"]
    if live is None:
        state = '<span class="bad">no live status (node-status.json missing)</span>'
    elif live.get("stale"):
        state = f'<span class="bad">stale: last heartbeat {escape(when(live.get("updated_at")))}</span>'
    else:
        up_h = (snap["now"] - float(live["started_at"])) / 3600
        state = (f'<span class="ok">running</span> &middot; AE {escape(str(live["ae_title"]))} port {int(live["port"])}'
                 f" &middot; pid {int(live['pid'])} &middot; up {up_h:.1f} h &middot; "
                 f"{int(live['associations'])} association(s) open")
    free = f"{health['free_bytes'] / 2**30:.1f} GiB"
    rows = [
        f"<tr><th>state</th><td>{state}</td></tr>",
        f"<tr><th>version</th>{_cell(snap['version'])}</tr>",
        f"<tr><th>spool free</th>{_cell(free)}</tr>",
        f"<tr><th>jobs</th>{_cell(_counts(health['jobs']))}</tr>",
        f"<tr><th>outbox</th>{_cell(_outbox_counts(health['outbox']))}</tr>",
        f"<tr><th>page time</th>{_cell(when(snap['now']))}</tr>",
    ]
    return "<h2>Node</h2><table>" + "".join(rows) + "</table>"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "none"


def _outbox_counts(counts: dict[str, int]) -> str:
    """``{"tps/pending": 2}`` as ``2 pending to tps``."""
    parts = []
    for key, n in sorted(counts.items()):
        destination, _, state = key.rpartition("/")
        parts.append(f"{n} {state} to {destination}")
    return ", ".join(parts) or "none"


def _models(snap: dict[str, Any]) -> str:
    live = snap["node"] or {}
    rows = []
    for seq, entry in sorted(live.get("models", {}).items()):
        for member in entry.get("members") or [entry]:
            spacing = member.get("max_spacing_mm")
            rows.append(f"<tr>{_cell(seq)}{_cell(member.get('name'))}{_cell(member.get('version'))}"
                        f"{_cell(member.get('device', entry.get('device')))}"
                        f"{_cell(f'<= {spacing:g} mm' if spacing else 'any')}</tr>")
    return "<h2>Models</h2>" + _table(["sequence", "model", "version", "device", "series spacing"], rows,
                                      "no models loaded")


def _studies(snap: dict[str, Any]) -> str:
    phi = snap["include_phi"]
    out = []
    for s in snap["studies"]:
        who = ""
        if phi and s.get("patient"):
            who = f" &middot; patient {escape(s['patient'])}"
        out.append(f'<h3 class="uid">{escape(s["study_instance_uid"])}</h3><p>'
                   f'<span class="{_STATE_CLASS.get(s["state"], "")}">{escape(s["state"])}</span>'
                   f" &middot; job {escape(str(s['job_id'] or '-'))} &middot; attempts {int(s['attempts'])}"
                   f" &middot; last received {escape(when(s['last_received_at']))}{who}"
                   + (f' &middot; <span class="bad">{escape(str(s["error"]))}</span>' if s["error"] else "")
                   + "</p>")
        rows = [f"<tr>{_cell(se['series_number'])}{_cell(se['modality'])}{_cell(se['instances'])}"
                f"{_cell(se['series_description'])}{_cell(se['label'], 'ok' if se['label'] not in (None, 'none') else '')}"
                f"{_cell(se['reason'])}{_cell(se['series_instance_uid'], 'uid')}</tr>" for se in s["series"]]
        out.append(_table(["#", "modality", "instances", "description", "label", "reason", "series UID"], rows,
                          "no series"))
    return "<h2>Studies</h2>" + ("".join(out) or '<p class="note">no studies in the spool</p>')


def _jobs(snap: dict[str, Any]) -> str:
    rows = [f"<tr>{_cell(j['id'])}{_cell(j['study_instance_uid'], 'uid')}{_state(j['state'])}{_cell(j['attempts'])}"
            f"{_cell(when(j['created_at']))}{_cell(when(j['updated_at']))}{_cell(j['error'])}</tr>"
            for j in snap["jobs"]]
    return "<h2>Jobs</h2>" + _table(["id", "study UID", "state", "attempts", "created", "updated", "error"], rows,
                                    "no jobs")


def _outbox(snap: dict[str, Any]) -> str:
    rows = [f"<tr>{_cell(o['id'])}{_cell(o['sop_instance_uid'], 'uid')}{_cell(o['destination'])}{_state(o['state'])}"
            f"{_cell(o['attempts'])}{_cell(o['last_status'])}{_cell(o['last_error'])}"
            f"{_cell(when(o['next_try_at']) if o['state'] == 'pending' else '-')}{_cell(when(o['sent_at']))}</tr>"
            for o in snap["outbox"]]
    return "<h2>Outbox</h2>" + _table(["id", "RTSTRUCT SOP UID", "destination", "state", "attempts", "last status",
                                       "last error", "next try", "sent"], rows, "nothing queued")


def _contours(snap: dict[str, Any]) -> str:
    out = []
    for c in snap["contours"]:
        out.append(
            f'<div class="contour"><p><b>{escape(c["label"] or "?")}</b> on series '
            f'<span class="uid">{escape(c["source_series_uid"])}</span> &middot; RTSTRUCT '
            f'<span class="uid">{escape(c["sop_instance_uid"])}</span> &middot; {escape(c["destinations"])}</p>'
            f'<img src="overlay/{int(c["id"])}.png" alt="contour on three slices of its series" loading="lazy"></div>')
    note = ('<p class="note">A preview for a first look: three slices through the contour (largest cross-section and '
            "two spread through it). Review every contour in the TPS; research software, not for clinical use.</p>")
    return "<h2>Contours</h2>" + note + ("".join(out) or '<p class="note">no RTSTRUCTs yet</p>')


def _warnings(snap: dict[str, Any]) -> str:
    rows = []
    for w in snap["warnings"]:
        extra = ", ".join(f"{k}={v}" for k, v in w.items() if k not in ("event", "level", "ts"))
        rows.append(f"<tr>{_cell(w.get('ts'))}{_cell(w.get('level'), 'bad' if w.get('level') == 'error' else 'warn')}"
                    f"{_cell(w.get('event'))}{_cell(extra[:400])}</tr>")
    return "<h2>Recent warnings</h2>" + _table(["time (UTC)", "level", "event", "fields"], rows,
                                               "no warnings since start")


def render_page(snap: dict[str, Any]) -> str:
    """The whole page (refreshes itself every :data:`REFRESH_SECONDS`)."""
    body = "".join([_node(snap), _models(snap), _contours(snap), _studies(snap), _jobs(snap), _outbox(snap),
                    _warnings(snap)])
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}"><title>dmg-node status</title>'
            f"<style>{_CSS}</style></head><body><h1>dmg-node status</h1>"
            '<p class="note">Read-only. Research software: every contour must be reviewed before use.</p>'
            f"{body}</body></html>")
