"""Prometheus metrics (docs/metrics.md): counters and histograms updated where things happen, and
gauges computed from the spool when /metrics is scraped.

Everything lives in a private :data:`REGISTRY` (not prometheus_client's global one), so importing
this module registers nothing process-wide and tests can read the values. The C-STORE path pays
one counter increment and one histogram observation per instance.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from dmg_node import __version__

REGISTRY = CollectorRegistry(auto_describe=True)

RECEIVED_BYTES = Counter(
    "dmg_node_received_bytes", "Bytes of instances stored by the C-STORE SCP (Part 10 files as written).",
    registry=REGISTRY)
STORE_SECONDS = Histogram(
    "dmg_node_store_seconds", "Time the C-STORE handler took per stored instance; _count is instances received.",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0), registry=REGISTRY)
STORE_FAILURES = Counter(
    "dmg_node_store_failures", "C-STORE requests answered with a failure status, by status name (PS3.4 B.2.3).",
    ["status"], registry=REGISTRY)
ASSOCIATIONS = Counter(
    "dmg_node_associations", "Associations requested of the SCP, by outcome (accepted or rejected).",
    ["outcome"], registry=REGISTRY)
SEGMENT_SECONDS = Histogram(
    "dmg_node_segment_seconds", "Model inference time per series, by sequence and model.",
    ["sequence", "model"], buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600), registry=REGISTRY)


#: In a receive worker process (``[node] workers`` > 1) the receive events go to the supervisor,
#: which serves /metrics, instead of this process's counters (:func:`forward_to`, :func:`replay`).
_forward: Callable[[tuple[Any, ...]], None] | None = None


def forward_to(sink: Callable[[tuple[Any, ...]], None] | None) -> None:
    """Send this process's receive events to *sink* (None: count them here again)."""
    global _forward
    _forward = sink


def stored(size: int, seconds: float) -> None:
    """Count one stored instance of *size* bytes that took *seconds* in the handler."""
    if _forward is not None:
        _forward(("stored", size, seconds))
        return
    RECEIVED_BYTES.inc(size)
    STORE_SECONDS.observe(seconds)


def store_failed(status: str) -> None:
    """Count one C-STORE answered with failure *status* (its name, lower case)."""
    if _forward is not None:
        _forward(("store_failed", status))
        return
    STORE_FAILURES.labels(status).inc()


def association(outcome: str) -> None:
    """Count one association request by *outcome* (accepted or rejected)."""
    if _forward is not None:
        _forward(("association", outcome))
        return
    ASSOCIATIONS.labels(outcome).inc()


def replay(events: list[tuple[Any, ...]]) -> None:
    """Count receive events forwarded by a worker process."""
    for event in events:
        kind, *args = event
        if kind == "stored":
            RECEIVED_BYTES.inc(args[0])
            STORE_SECONDS.observe(args[1])
        elif kind == "store_failed":
            STORE_FAILURES.labels(str(args[0])).inc()
        elif kind == "association":
            ASSOCIATIONS.labels(str(args[0])).inc()


class SpoolCounts(Protocol):
    """The read-only spool queries the scrape needs (:class:`dmg_node.storage.spool.Spool`)."""

    def state_counts(self) -> dict[str, dict[str, int]]: ...

    def free_bytes(self) -> int: ...


class ScrapeCollector(Collector):
    """Gauges read at scrape time: jobs by state, outbox items, free disk, open associations, models.

    Parameters
    ----------
    spool
        The spool's read-only queries.
    status
        The node's live status (``node-status.json``: associations, models), or None when absent.
    """

    def __init__(self, spool: SpoolCounts, status: Callable[[], dict[str, Any] | None]) -> None:
        self.spool = spool
        self.status = status

    def collect(self) -> Iterator[Metric]:
        counts = self.spool.state_counts()
        jobs = GaugeMetricFamily("dmg_node_jobs", "Study jobs in the index, by state.", labels=["state"])
        for state in ("pending", "running", "done", "failed"):
            jobs.add_metric([state], counts["jobs"].get(state, 0))
        yield jobs
        outbox = GaugeMetricFamily("dmg_node_outbox_items", "RTSTRUCT sends in the outbox, by destination and state.",
                                   labels=["destination", "state"])
        for key, n in sorted(counts["outbox"].items()):
            destination, _, state = key.rpartition("/")
            outbox.add_metric([destination, state], n)
        yield outbox
        yield GaugeMetricFamily("dmg_node_spool_free_bytes", "Free bytes on the spool's file system.",
                                value=self.spool.free_bytes())
        info = GaugeMetricFamily("dmg_node_info", "Always 1; the running version as a label.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        live = self.status() or {}
        if "associations" in live:
            yield GaugeMetricFamily("dmg_node_associations_active", "Associations open now.",
                                    value=int(live["associations"]))
        models = GaugeMetricFamily("dmg_node_model_info", "Always 1 per loaded model, by sequence, model and version.",
                                   labels=["sequence", "model", "version"])
        for sequence, entry in sorted(live.get("models", {}).items()):
            for member in entry.get("members") or [entry]:
                models.add_metric([sequence, str(member["name"]), str(member["version"])], 1)
        yield models


class _Both(Collector):
    def __init__(self, *collectors: Collector) -> None:
        self.collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for c in self.collectors:
            yield from c.collect()


def exposition(scrape: ScrapeCollector) -> bytes:
    """The Prometheus text format of :data:`REGISTRY` plus the scrape-time gauges."""
    return generate_latest(_Both(REGISTRY, scrape))
