"""LMCache 0.5.6's controller gauges on kvbus's `/metrics`, so dashboards and alerts built on them keep working.

LMCache names thirteen gauges `lmcache:cache_controller_*`, each with the label role="controller". Nine
mean the same in kvbus: keys indexed (summed over workers, as LMCache counts them), workers registered,
LMCache workers' sequence gaps and full syncs (read from the fleet at each scrape), and the messages
this process's LMCache sockets received. The four about pending and in-process socket work report
the value of a quiet controller: docs/compatibility.md lists them.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvbus.controller import fleet

PREFIX = "lmcache:cache_controller_"
ROLE = ["controller"]

# name -> (LMCache's help, kvbus's value, what that value means here)
_QUIET: dict[str, tuple[str, float, str]] = {
    "pull_socket_has_pending": (
        "Whether PULL socket has pending messages (1=yes, 0=no)",
        0,
        "kvbus reads as it receives",
    ),
    "reply_socket_has_pending": (
        "Whether REPLY socket has pending messages (1=yes, 0=no)",
        0,
        "kvbus reads as it receives",
    ),
    "pull_socket_active_requests": ("Number of requests being processed from PULL socket", 0, "not tracked"),
    "reply_socket_active_requests": ("Number of requests being processed from REPLY socket", 0, "not tracked"),
}
_FLEET = ("kv_pool_keys_count", "registered_workers_count", "kv_op_seq_discontinuity_count")
_SYNC = (
    "full_sync_workers_syncing",
    "full_sync_workers_completed",
    "full_sync_global_progress",
    "full_sync_missing_batches_total",
)
NAMES = (*_FLEET, *_SYNC, "pull_socket_message_count", "reply_socket_message_count", *_QUIET)


class LMCacheGauges(Collector):
    """LMCache's gauges for one scrape; the fleet ones are absent when Redis could not be read.

    The socket message counts are this process's own (the sockets it binds), like LMCache's; the
    rest describe the whole fleet, read from Redis, so every replica reports the same.
    """

    def __init__(self, snapshot: fleet.Fleet | None, messages: dict[str, int]) -> None:
        self._fleet = snapshot
        self._messages = messages

    def collect(self) -> Iterator[Metric]:
        if self._fleet is not None:
            yield from _fleet_gauges(self._fleet)
            yield from _sync_gauges(self._fleet)
        for socket in ("pull", "reply"):
            yield _gauge(
                f"{socket}_socket_message_count",
                f"The total number of messages received on {socket.upper()} socket (kvbus: by this process)",
                self._messages.get(socket, 0),
            )
        for name, (help_text, value, why) in _QUIET.items():
            yield _gauge(name, f"{help_text} (kvbus: always {value:g}: {why})", value)


def _fleet_gauges(snapshot: fleet.Fleet) -> Iterator[Metric]:
    workers = [w for i in snapshot.instances for w in i.workers]
    yield _gauge(
        "kv_pool_keys_count",
        "The number of keys in the KV pool (kvbus: chunks indexed, summed over workers)",
        sum(i.key_count for i in snapshot.instances),
    )
    yield _gauge("registered_workers_count", "The total number of registered workers", len(workers))
    yield _gauge(
        "kv_op_seq_discontinuity_count",
        "Total count of KV operation sequence number discontinuities (kvbus: LMCache workers' gaps since they "
        "registered; kvbus agents have no sequence)",
        sum(w.lmcache.gaps for w in workers if w.lmcache is not None),
    )


def _sync_gauges(snapshot: fleet.Fleet) -> Iterator[Metric]:
    states = [w.lmcache for i in snapshot.instances for w in i.workers if w.lmcache is not None and w.lmcache.sync_id]
    done = sum(s.sync_complete for s in states)
    yield _gauge("full_sync_workers_syncing", "Number of workers currently in full sync", len(states) - done)
    yield _gauge("full_sync_workers_completed", "Number of workers that have completed full sync", done)
    yield _gauge(
        "full_sync_global_progress", "Global full sync progress (0.0 to 1.0)", done / len(states) if states else 1.0
    )
    yield _gauge(
        "full_sync_missing_batches_total",
        "Total count of missing batches across all syncing workers",
        sum(len(s.missing_batches) for s in states if not s.sync_complete),
    )


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(PREFIX + name, help_text, labels=["role"])
    family.add_metric(ROLE, value)
    return family
