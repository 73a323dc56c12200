"""Prometheus metrics of a broker (``pervade broker --metrics-port``), served by prometheus-client on a
thread of its own.

The broker's records are only safe to read on its event loop, so the exporter never reads them: the loop
hands it a fresh ``StatusSnapshot`` about once a second (``update``), and a scrape turns the latest one
into metric families (``collect``). Its registry is the exporter's own, not prometheus-client's global one.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator

import structlog
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pervade.protocol import StatusSnapshot

log = structlog.get_logger("broker")

#: Seconds between the snapshots the broker hands the exporter.
METRICS_REFRESH_S = 1.0
#: Where the model-file bytes came from, by counter name (label ``source``).
_BYTE_SOURCES = {"peer_bytes": "peer", "origin_bytes": "origin", "cached_bytes": "cache"}
#: Broker counters exported under names of their own (the rest as ``pervade_<counter>_total``).
_NAMED = {"requeues", "batches_failed", "context_loads", "context_load_failures", "claims_completed", *_BYTE_SOURCES}


class SnapshotCollector(Collector):
    """Metric families made from the latest snapshot the broker handed over."""

    def __init__(self) -> None:
        self._snapshot: StatusSnapshot | None = None
        self._lock = threading.Lock()

    def update(self, snapshot: StatusSnapshot) -> None:
        with self._lock:
            self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            snapshot = self._snapshot
        if snapshot is None:
            return
        yield from _queue_metrics(snapshot)
        yield from _worker_metrics(snapshot)
        yield from _progress_metrics(snapshot)
        yield from _counter_metrics(snapshot)


def _queue_metrics(snapshot: StatusSnapshot) -> Iterator[Metric]:
    depth = GaugeMetricFamily(
        "pervade_queue_depth_batches", "Batches queued per context", labels=["context_id", "model"]
    )
    for ctx in snapshot.contexts:
        depth.add_metric([ctx.context_id, ctx.model], ctx.queued_batches)
    yield depth
    batches = GaugeMetricFamily("pervade_batches", "Batches the broker holds, by status", labels=["status"])
    for status in ("queued", "assigned", "done", "delivered", "written"):
        batches.add_metric([status], snapshot.batches.get(status, 0))
    yield batches


def _worker_metrics(snapshot: StatusSnapshot) -> Iterator[Metric]:
    workers = GaugeMetricFamily("pervade_workers", "Live workers, by state and device", labels=["state", "device"])
    for (state, device), count in sorted(Counter((w.state, w.device) for w in snapshot.workers).items()):
        workers.add_metric([state, device], count)
    yield workers
    per_worker = GaugeMetricFamily("pervade_worker_claims_per_second", "Claims per second of each worker (30 s window)",
                                   labels=["worker_id", "device"])  # fmt: skip
    for w in snapshot.workers:
        per_worker.add_metric([w.worker_id, w.device], w.claims_per_s)
    yield per_worker
    yield GaugeMetricFamily("pervade_sinks", "Connected sinks", value=snapshot.sinks)
    yield GaugeMetricFamily("pervade_producers", "Connected producers", value=snapshot.producers)


def _progress_metrics(snapshot: StatusSnapshot) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "pervade_claims_per_second", "Claims completed per second (30 s window)", value=snapshot.claims_per_s
    )
    yield GaugeMetricFamily("pervade_pairs", "Pairs of every job the broker knows", value=snapshot.pairs_total)
    yield GaugeMetricFamily("pervade_pairs_done", "Pairs written or recorded failed", value=snapshot.pairs_done)
    if snapshot.eta_s is not None:
        yield GaugeMetricFamily(
            "pervade_eta_seconds", "Seconds until the open jobs are done at the current rate", value=snapshot.eta_s
        )
    yield GaugeMetricFamily("pervade_uptime_seconds", "Seconds since the broker started", value=snapshot.uptime_s)


def _counter_metrics(snapshot: StatusSnapshot) -> Iterator[Metric]:
    c = snapshot.counters
    yield CounterMetricFamily(
        "pervade_requeues", "Batches put back in a queue after a worker failed or died", value=c.get("requeues", 0)
    )
    yield CounterMetricFamily(
        "pervade_batches_failed", "Batches given up on after max attempts", value=c.get("batches_failed", 0)
    )
    yield CounterMetricFamily(
        "pervade_context_loads", "Contexts workers reported loaded", value=c.get("context_loads", 0)
    )
    yield CounterMetricFamily(
        "pervade_context_load_failures", "Contexts workers could not load", value=c.get("context_load_failures", 0)
    )
    yield CounterMetricFamily(
        "pervade_claims_completed", "Claims of the batches workers completed", value=c.get("claims_completed", 0)
    )
    model_bytes = CounterMetricFamily(
        "pervade_model_file_bytes", "Model-file bytes workers got, by source", labels=["source"]
    )
    for counter, source in _BYTE_SOURCES.items():
        model_bytes.add_metric([source], c.get(counter, 0))
    yield model_bytes
    for name, value in sorted(c.items()):
        if name not in _NAMED:
            yield CounterMetricFamily(f"pervade_{name}", f"Broker counter {name} (docs/monitoring.md)", value=value)


class MetricsExporter:
    """An HTTP server for Prometheus on ``host:port`` (port 0: a free one, see ``port``)."""

    def __init__(self, host: str, port: int) -> None:
        self.collector = SnapshotCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.host = host
        self.port: int = self._server.server_address[1]
        log.info("metrics_listening", url=f"http://{host}:{self.port}/metrics")

    def update(self, snapshot: StatusSnapshot) -> None:
        self.collector.update(snapshot)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
