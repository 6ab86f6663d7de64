"""kvbus answers as LMCache 0.5.6's controller does, field for field: every request LMCache's own controller
was recorded answering (tests/lmcache/recorded_answers.json, made by tests/lmcache/record_answers.py) is
replayed, in the recorded order, against kvbus with kvbus agents holding the same chunks, and each answer
is compared with LMCache's.

Compared: the status; every field LMCache answers, by value, except what varies from run to run (event
ids keep LMCache's prefix; times and ports keep their type); lists item by item. kvbus may add fields of
its own (KVBUS_EXTRAS), never drop or retype one. Where kvbus answers differently on purpose, the record
is in DIFFERENCES with kvbus's answer and the reason, and docs/compatibility.md names it.

Set-up, as recorded: `inst_tp2` (two ranks; rank 0 holds the 12-token seed prompt and tokens 1000..1599,
rank 1 nothing) registers before `inst_single` (one rank holding tokens 1000..1599); chunks of 256.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from kvbus.agent.agent import Agent
from kvbus.agent.synthetic import synthetic_kv
from kvbus.controller import compat_metrics
from kvbus.shared.config import KVBusConfig
from tests.conftest import MODEL, SEED_TOKENS

ROOT = Path(__file__).resolve().parents[2]
RECORDED: list[dict[str, Any]] = json.loads((ROOT / "tests/lmcache/recorded_answers.json").read_text())
BY_NAME = {record["name"]: record for record in RECORDED}
COMPATIBILITY = (ROOT / "docs/compatibility.md").read_text()
RANGE = list(range(1000, 1600))
CPU = "LocalCPUBackend"
BASE = KVBusConfig(enable_controller=True, command_timeout=2.0, heartbeat_interval=0.1, heartbeat_ttl=30)

VARYING = {"event_id", "registration_time", "last_heartbeat_time", "port"}  # compared by type (event_id: prefix)
KVBUS_EXTRAS = {"error", "field", "instance_id", "path", "pid", "hostname", "layout", "num_tokens_per_worker"}
REQUEST_CONTENT_TYPES = {"body_text_plain": "text/plain"}  # the others were sent as application/json
SEPARATE = {"metrics": "test_lmcache_s_metric_names_are_served_beside_kvbus_s"}


@dataclass(frozen=True)
class Difference:
    """kvbus's answer where it differs from LMCache's on purpose; docs/compatibility.md says why."""

    status: int
    answer: dict[str, Any] = field(default_factory=dict)  # fields kvbus's answer has, where they tell


def _unknown(error: str = "unknown_instance") -> Difference:
    return Difference(404, {"error": error})


def _refused(detail_part: str) -> Difference:
    return Difference(400, {"error": "refused", "detail_contains": detail_part})


def _layout(layout: dict[str, list[Any]]) -> Difference:
    return Difference(200, {"layout_info": layout})


def _all_workers(total: int) -> Difference:
    return Difference(200, {"total_count": total})


CACHEGEN = "cachegen is LMCache's own compression method"
DIFFERENCES: dict[str, Difference] = {
    # LMCache credits an instance when any one rank holds a chunk, and only the first-registered holder;
    # kvbus credits every instance whose every rank holds the prefix (inst_tp2's rank 1 holds nothing).
    "lookup_hit_seed_prompt": _layout({}),
    "lookup_extra_field_ignored": _layout({}),
    "coerce_tokens_numeric_strings_and_floats": _layout({}),
    "lookup_hit_range_two_holders": _layout({"inst_single": [CPU, 600]}),
    "lookup_partial_hit": _layout({"inst_single": [CPU, 256]}),
    "lookup_longer_than_stored": _layout({"inst_single": [CPU, 512]}),
    "lookup_after_compress": _layout({"inst_single": [CPU, 600]}),
    # A move between instances whose rank counts differ, and without P2P: LMCache 500, kvbus a refusal.
    **{f"coerce_should_copy_{v!r}": _refused("same number") for v in ("true", "yes", "on", 1, "1")},
    "move_without_p2p": _refused("same number"),
    # LMCache's 30 s cache behind "all" and the bare /controller/workers: stale; kvbus reads Redis each time.
    "query_worker_info_all_stale_cache": Difference(200),
    "workers_all_stale_cache": _all_workers(3),
    "workers_worker_id_only": _all_workers(3),
    "workers_unknown_param": _all_workers(3),
    # LMCache's 500s: a response model that refuses its own null, a NotImplementedError.
    "query_instance_unknown_ip": Difference(200, {"res": None}),
    "check_finish": _unknown("unknown_event"),
    # An instance nobody registered: LMCache 200 {} for /health, a 500 assertion for commands.
    "health_unknown_instance": _unknown(),
    "clear_unknown_instance": _unknown(),
    "pin_unknown_instance": _unknown(),
    "compress_unknown_instance": _unknown(),
    "decompress_unknown_instance": _unknown(),
    "move_unknown_instance": _unknown(),
    # Ranks that disagree: LMCache 500 (after clearing rank 0); kvbus the smallest count, and each rank's.
    "clear_tp2_ranks_disagree": Difference(200, {"num_tokens": 0, "num_tokens_per_worker": {"0": 612, "1": 0}}),
    "pin_tp2_ranks_disagree": Difference(200, {"num_tokens": 0, "num_tokens_per_worker": {"0": 12, "1": 0}}),
    # cachegen: kvbus passes it on; its own agents refuse it (LMCache workers, through the bridge, run it).
    "compress_cachegen_no_tokens": _refused(CACHEGEN),
    "compress_cachegen_tokens_null": _refused(CACHEGEN),
    "compress_cachegen_range": _refused(CACHEGEN),
    "decompress_cachegen_range": _refused(CACHEGEN),
    "compress_tp2_ranks_disagree": _refused(CACHEGEN),
    # zlib is one of kvbus's methods; LMCache knows only cachegen and compresses nothing.
    "compress_unknown_method": Difference(200, {"num_tokens": 600}),
    # LMCache never delivers a closing engine's DeRegisterMsg: it keeps the worker, and a command to it hangs.
    "workers_after_engines_closed": _unknown(),
    "health_after_engines_closed": _unknown(),
    # A body not sent as JSON: FastAPI reads it as text and answers 422; kvbus refuses it unread, since a web
    # page can POST text/plain to any site without a CORS preflight.
    "body_text_plain": Difference(415, {"error": "unsupported_media_type"}),
}


@pytest.fixture
def config(redis_url: str) -> KVBusConfig:
    return BASE.with_overrides(redis_url=redis_url)


class Fleet:
    """The recorded set-up, as kvbus agents: started, stored into and stopped when the recording did."""

    def __init__(self, config: KVBusConfig) -> None:
        self._config = config
        self.agents: dict[str, Agent] = {}

    def start(self) -> None:
        for name, instance, rank in (
            ("tp2_rank0", "inst_tp2", 0),
            ("tp2_rank1", "inst_tp2", 1),
            ("single", "inst_single", 0),
        ):
            agent = Agent(self._config.with_overrides(lmcache_instance_id=instance), model=MODEL, worker_id=rank)
            agent.start()
            self.agents[name] = agent
            time.sleep(0.01)  # registration order, which LMCache's answers follow

    def store_all(self) -> None:
        for name, prompt in (("tp2_rank0", SEED_TOKENS), ("tp2_rank0", RANGE), ("single", RANGE)):
            agent = self.agents[name]
            agent.tiers.store(prompt, synthetic_kv(agent.space, prompt))
            agent.index.flush()

    def stop(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        self.agents.clear()


@pytest.fixture
def fleet(config: KVBusConfig) -> Iterator[Fleet]:
    started = Fleet(config)
    yield started
    started.stop()


def replay(client: TestClient, record: dict[str, Any]) -> tuple[int, Any]:
    if record["method"] == "GET":
        response = client.get(record["path"])
    elif record.get("raw_body"):
        content_type = REQUEST_CONTENT_TYPES.get(record["name"], "application/json")
        response = client.post(record["path"], content=record["body"].encode(), headers={"content-type": content_type})
    else:
        response = client.post(record["path"], json=record["body"])
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, response.text


def mismatches(ours: Any, theirs: Any, where: str = "") -> list[str]:
    """Where kvbus's answer `ours` fails LMCache's `theirs`: a field missing, retyped, or of another value."""
    if isinstance(theirs, dict):
        if not isinstance(ours, dict):
            return [f"{where}: {type(ours).__name__} where LMCache has an object"]
        found = [f"{where}.{key}: extra field" for key in ours.keys() - theirs.keys() - KVBUS_EXTRAS]
        for key, value in theirs.items():
            if key not in ours:
                found.append(f"{where}.{key}: missing")
            elif key in VARYING:
                found += _same_kind(key, ours[key], value, f"{where}.{key}")
            else:
                found += mismatches(ours[key], value, f"{where}.{key}")
        return found
    if isinstance(theirs, list):
        if not isinstance(ours, list) or len(ours) != len(theirs):
            return [f"{where}: {ours!r} where LMCache has {theirs!r}"]
        return [m for n, (a, b) in enumerate(zip(ours, theirs, strict=True)) for m in mismatches(a, b, f"{where}[{n}]")]
    if type(ours) is not type(theirs) or ours != theirs:
        return [f"{where}: {ours!r} where LMCache has {theirs!r}"]
    return []


def _same_kind(key: str, ours: Any, theirs: Any, where: str) -> list[str]:
    if key == "event_id" and isinstance(theirs, str) and len(theirs) > 36:
        prefix = theirs[:-36]  # LMCache's ids are the operation's name and a uuid4
        return [] if isinstance(ours, str) and ours.startswith(prefix) else [f"{where}: {ours!r} lacks {prefix!r}"]
    return [] if type(ours) is type(theirs) else [f"{where}: {ours!r} where LMCache has a {type(theirs).__name__}"]


def differs_as_documented(name: str, status: int, answer: Any) -> list[str]:
    expected = DIFFERENCES[name]
    if status != expected.status:
        return [f"{name}: status {status}, documented {expected.status}: {answer!r}"]
    found = []
    for key, value in expected.answer.items():
        if key == "detail_contains":
            if value not in str(answer.get("detail")):
                found.append(f"{name}: detail {answer.get('detail')!r} lacks {value!r}")
        elif answer.get(key) != value:
            found.append(f"{name}: {key} is {answer.get(key)!r}, documented {value!r}")
    return found


def test_every_recorded_answer_is_lmcache_s_or_a_documented_difference(
    config: KVBusConfig, fleet: Fleet, client: TestClient
) -> None:
    found: list[str] = []
    compared = 0
    for record in RECORDED:
        name = record["name"]
        if name == "lookup_empty_tokens":
            fleet.start()
            fleet.store_all()
        if name == "pin_single":  # the recording stored everything again after its clears
            fleet.store_all()
        if name == "workers_after_engines_closed":
            fleet.stop()
        if name in SEPARATE:
            continue
        status, answer = replay(client, record)
        if name in DIFFERENCES:
            found += differs_as_documented(name, status, answer)
        elif status != record["status"]:
            found.append(f"{name}: status {status} where LMCache answers {record['status']}: {answer!r}")
        else:
            found += [f"{name}: {m}" for m in mismatches(answer, record["response"])]
            compared += 1
    assert not found, "\n".join(found)
    assert compared == len(RECORDED) - len(DIFFERENCES) - len(SEPARATE) > 80


def test_the_recording_and_the_differences_agree() -> None:
    """Each difference is a recorded request whose LMCache answer is not kvbus's, and the doc names it."""
    assert set(DIFFERENCES) <= set(BY_NAME)
    assert set(SEPARATE) <= set(BY_NAME)
    for name, difference in DIFFERENCES.items():
        recorded = BY_NAME[name]
        assert recorded["status"] != difference.status or difference.answer or recorded["response"], name
        assert f"`{name}`" in COMPATIBILITY, f"docs/compatibility.md does not name {name}"
    # LMCache's 500s and hang are all differences: kvbus answers none of those.
    assert {r["name"] for r in RECORDED if r["status"] in (500, None)} <= set(DIFFERENCES)


def test_lmcache_s_metric_names_are_served_beside_kvbus_s(
    config: KVBusConfig, fleet: Fleet, client: TestClient
) -> None:
    fleet.start()
    fleet.store_all()
    for agent in fleet.agents.values():
        agent.registration.heartbeat()  # /metrics shows the fleet as of each worker's last heartbeat
    families = {family.name: family for family in text_string_to_metric_families(client.get("/metrics").text)}
    recorded = BY_NAME["metrics"]["metric_names"]
    # prometheus_client's parser drops a counter's _total; the recording kept the names as written.
    served = set(families) | {f"{name}_total" for name in families}
    assert set(recorded) <= served, set(recorded) - served
    lmcache = {name for name in recorded if name.startswith(compat_metrics.PREFIX)}
    assert lmcache == {compat_metrics.PREFIX + name for name in compat_metrics.NAMES}
    for name in lmcache:
        (sample,) = families[name].samples
        assert sample.labels == {"role": "controller"} and families[name].type == "gauge", name
    assert families[compat_metrics.PREFIX + "kv_pool_keys_count"].samples[0].value == 7  # as LMCache counted
    assert families[compat_metrics.PREFIX + "registered_workers_count"].samples[0].value == 3
    assert families["kvbus_redis_up"].samples[0].value == 1  # kvbus's own stay
