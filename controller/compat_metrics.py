"""LMCache 0.5.6's controller gauges on kvbus's `/metrics`, so dashboards and alerts built on them keep working.

LMCache names thirteen gauges `lmcache:cache_controller_*`, each with the label role="controller". Two
mean the same in kvbus and are read from the fleet at each scrape, as kvbus's own series are: the keys
indexed (summed over workers, as LMCache counts them) and the workers registered. The other eleven
describe LMCache's ZMQ sockets and its admit/evict sequence and full-sync bookkeeping, which kvbus's
agents do not have: they write their index to Redis themselves, in order, and a restarted controller
loses nothing. Those report the value of a quiet LMCache controller (no messages counted, nothing
pending, no gap, no sync running, progress 1.0). docs/compatibility.md lists them.
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
    "pull_socket_message_count": (
        "The total number of messages received on PULL socket",
        0,
        "kvbus's agents send no ZMQ messages",
    ),
    "reply_socket_message_count": (
        "The total number of messages received on REPLY socket",
        0,
        "kvbus's agents send no ZMQ messages",
    ),
    "pull_socket_has_pending": ("Whether PULL socket has pending messages (1=yes, 0=no)", 0, "no socket waits here"),
    "reply_socket_has_pending": ("Whether REPLY socket has pending messages (1=yes, 0=no)", 0, "no socket waits here"),
    "pull_socket_active_requests": ("Number of requests being processed from PULL socket", 0, "no socket"),
    "reply_socket_active_requests": ("Number of requests being processed from REPLY socket", 0, "no socket"),
    "kv_op_seq_discontinuity_count": (
        "Total count of KV operation sequence number discontinuities",
        0,
        "agents write their index to Redis directly, with no sequence to break",
    ),
    "full_sync_workers_syncing": ("Number of workers currently in full sync", 0, "kvbus has no full sync"),
    "full_sync_workers_completed": ("Number of workers that have completed full sync", 0, "kvbus has no full sync"),
    "full_sync_global_progress": ("Global full sync progress (0.0 to 1.0)", 1.0, "nothing to sync"),
    "full_sync_missing_batches_total": (
        "Total count of missing batches across all syncing workers",
        0,
        "kvbus has no full sync",
    ),
}
NAMES = ("kv_pool_keys_count", "registered_workers_count", *_QUIET)


class LMCacheGauges(Collector):
    """LMCache's gauges for one scrape; the fleet ones are absent when Redis could not be read."""

    def __init__(self, snapshot: fleet.Fleet | None) -> None:
        self._fleet = snapshot

    def collect(self) -> Iterator[Metric]:
        if self._fleet is not None:
            instances = self._fleet.instances
            yield _gauge(
                "kv_pool_keys_count",
                "The number of keys in the KV pool (kvbus: chunks indexed, summed over workers)",
                sum(i.key_count for i in instances),
            )
            yield _gauge(
                "registered_workers_count",
                "The total number of registered workers",
                sum(len(i.workers) for i in instances),
            )
        for name, (help_text, value, why) in _QUIET.items():
            yield _gauge(name, f"{help_text} (kvbus: always {value:g}: {why})", value)


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(PREFIX + name, help_text, labels=["role"])
    family.add_metric(ROLE, value)
    return family
