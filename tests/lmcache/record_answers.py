"""Record what LMCache 0.5.6's own controller answers over HTTP, for kvbus's compatibility tests.

Run: .venv-lmcache/bin/python tests/lmcache/record_answers.py   (about a minute; writes recorded_answers.json)

Set-up, all on 127.0.0.1: `python -m lmcache.v1.api_server` with pull, reply and heartbeat ports, and three
real LMCacheEngines in this process (harness.build_engine), without heartbeats (LMCache's default):
- `inst_tp2`: TP=2; rank 0 stores the seed prompt (12 tokens, one partial chunk) and tokens 1000..1599
  (three chunks); rank 1 stores nothing.
- `inst_single`: TP=1, registered after inst_tp2; stores tokens 1000..1599 too.
Event ids and timestamps differ from run to run; compare shapes. Each record: name, method, path, body (a JSON
value, or a raw string where the body is not valid JSON: `raw_body` true), status, response (parsed JSON,
else text), and a note where the answer needs one.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness
import httpx

OUT = Path(__file__).with_name("recorded_answers.json")
SEED_PROMPT = [128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]
RANGE_PROMPT = list(range(1000, 1600))
CPU = "LocalCPUBackend"
HTTP_TIMEOUT_S = 30.0  # 0.5.6 puts no timeout on its worker round trips; this bounds a hang
CACHE_TTL_S = 30.0  # the registry's cache behind `instance_id: "all"` and the bare /controller/workers
WAIT_S = 30.0


@dataclass
class Recorder:
    base: str
    client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=HTTP_TIMEOUT_S))
    records: list[dict[str, Any]] = field(default_factory=list)

    def post(self, name: str, path: str, body: Any, note: str | None = None) -> dict[str, Any]:
        response = self.client.post(f"{self.base}{path}", json=body)
        return self._keep(name, "POST", path, body, False, response, note)

    def post_unanswered(self, name: str, path: str, body: Any, wait_s: float, note: str) -> None:
        """A request 0.5.6 may never answer: recorded with status null once `wait_s` passes."""
        try:
            response = self.client.post(f"{self.base}{path}", json=body, timeout=wait_s)
        except httpx.TimeoutException:
            self.records.append(
                {"name": name, "method": "POST", "path": path, "body": body, "status": None}
                | {"response": f"no answer within {wait_s:g} s", "note": note}
            )
            print(f"--- POST {path} [{name}] no answer within {wait_s:g} s")
            return
        self._keep(name, "POST", path, body, False, response, note)

    def post_raw(
        self, name: str, path: str, raw: str, note: str | None = None, content_type: str | None = None
    ) -> None:
        headers = {"Content-Type": content_type or "application/json"}
        response = self.client.post(f"{self.base}{path}", content=raw.encode(), headers=headers)
        self._keep(name, "POST", path, raw, True, response, note)

    def get(self, name: str, path: str, note: str | None = None) -> dict[str, Any]:
        response = self.client.get(f"{self.base}{path}")
        return self._keep(name, "GET", path, None, False, response, note)

    def _keep(
        self, name: str, method: str, path: str, body: Any, raw: bool, response: httpx.Response, note: str | None
    ) -> dict[str, Any]:
        try:
            parsed: Any = response.json()
        except ValueError:
            parsed = response.text
        record: dict[str, Any] = {"name": name, "method": method, "path": path, "body": body}
        if raw:
            record["raw_body"] = True
        record |= {"status": response.status_code, "response": parsed}
        if response.headers.get("content-type", "").split(";")[0] != "application/json":
            record["content_type"] = response.headers.get("content-type")
        if note:
            record["note"] = note
        self.records.append(record)
        print(f"{response.status_code} {method} {path} [{name}] {json.dumps(parsed)[:160]}")
        return record


@contextmanager
def fleet(controller: harness.Controller) -> Iterator[dict[str, Any]]:
    """inst_tp2 (two ranks) and inst_single (one), registered in that order; closed on the way out."""
    pull, reply = f"127.0.0.1:{controller.pull}", f"127.0.0.1:{controller.reply}"
    tp2_ports = [harness.free_port(), harness.free_port()]
    specs = {
        "tp2_rank0": harness.WorkerSpec("inst_tp2", 0, 2, tp2_ports),
        "tp2_rank1": harness.WorkerSpec("inst_tp2", 1, 2, tp2_ports),
        "single": harness.WorkerSpec("inst_single", 0, 1, [harness.free_port()]),
    }
    engines: dict[str, Any] = {}
    try:
        for name, spec in specs.items():
            engines[name] = harness.build_engine(spec, pull, reply)
            # One at a time, so that registration order (which 0.5.6's lookup and query_instance follow) is fixed.
            harness.wait_for(lambda s=spec: registered(controller, s), WAIT_S, f"{name} to register")
        yield engines
    finally:
        for name, engine in engines.items():
            harness.close_engine(engine, specs[name])


def registered(controller: harness.Controller, spec: harness.WorkerSpec) -> bool:
    # The one-worker form of /controller/workers reads the registry itself, not its 30 s cache.
    url = f"{controller.url}/controller/workers?instance_id={spec.instance_id}&worker_id={spec.worker_id}"
    return httpx.get(url, timeout=5).status_code == 200


def key_count(controller: harness.Controller) -> int:
    count: int = httpx.get(f"{controller.url}/controller/key-stats", timeout=5).json()["total_key_count"]
    return count


def record_lookups(rec: Recorder) -> None:
    rec.post("lookup_empty_tokens", "/lookup", {"tokens": []})
    rec.post("lookup_hit_seed_prompt", "/lookup", {"tokens": SEED_PROMPT}, "held by inst_tp2 rank 0 only")
    rec.post(
        "lookup_hit_range_two_holders",
        "/lookup",
        {"tokens": RANGE_PROMPT},
        "inst_tp2 and inst_single both hold all three chunks; only the first-registered holder is named",
    )
    rec.post("lookup_partial_hit", "/lookup", {"tokens": RANGE_PROMPT[:256] + [7] * 100}, "first chunk only")
    rec.post("lookup_longer_than_stored", "/lookup", {"tokens": RANGE_PROMPT + [7] * 10}, "the last chunk differs")
    rec.post(
        "lookup_seed_prompt_extended",
        "/lookup",
        {"tokens": [*SEED_PROMPT, 5, 5]},
        "the stored partial chunk was 12 tokens; 14 tokens hash differently",
    )
    rec.post("lookup_miss", "/lookup", {"tokens": [1, 2, 3]})
    rec.post("lookup_extra_field_ignored", "/lookup", {"tokens": SEED_PROMPT, "instance_id": "x"})
    rec.post("lookup_negative_token", "/lookup", {"tokens": [-1, 5]})
    rec.post("lookup_huge_token", "/lookup", {"tokens": [2**40, 2**63 - 1]})


def record_body_errors(rec: Recorder) -> None:
    rec.post_raw("malformed_json", "/lookup", '{"tokens": [1, 2')
    rec.post_raw("empty_body", "/lookup", "")
    rec.post_raw("body_json_array", "/lookup", "[1, 2, 3]")
    rec.post_raw("body_json_null", "/lookup", "null")
    rec.post_raw("body_json_string", "/lookup", '"tokens"')
    rec.post_raw("body_text_plain", "/lookup", json.dumps({"tokens": [1]}), content_type="text/plain")
    rec.post_raw("empty_body_clear", "/clear", "")
    rec.post_raw("malformed_json_clear", "/clear", "{instance_id: inst_single}")


def record_field_errors(rec: Recorder) -> None:
    cases: list[tuple[str, str, Any]] = [
        ("lookup_missing_tokens", "/lookup", {}),
        ("lookup_tokens_null", "/lookup", {"tokens": None}),
        ("lookup_tokens_string", "/lookup", {"tokens": "1 2 3"}),
        ("lookup_tokens_bad_item", "/lookup", {"tokens": [1, "x", None]}),
        ("lookup_tokens_fractional", "/lookup", {"tokens": [1.5]}),
        ("lookup_tokens_object", "/lookup", {"tokens": {"0": 1}}),
        ("clear_missing_all", "/clear", {}),
        ("clear_missing_location", "/clear", {"instance_id": "inst_single"}),
        ("clear_instance_id_list", "/clear", {"instance_id": ["inst_single"], "location": CPU}),
        ("clear_location_null", "/clear", {"instance_id": "inst_single", "location": None}),
        ("pin_missing_all", "/pin", {}),
        ("pin_missing_tokens", "/pin", {"instance_id": "inst_single", "location": CPU}),
        ("pin_tokens_string", "/pin", {"instance_id": "inst_single", "location": CPU, "tokens": "abc"}),
        ("compress_missing_all", "/compress", {}),
        ("compress_missing_method", "/compress", {"instance_id": "inst_single", "location": CPU}),
        (
            "compress_tokens_string",
            "/compress",
            {"instance_id": "inst_single", "method": "cachegen", "location": CPU, "tokens": "x"},
        ),
        ("decompress_missing_all", "/decompress", {}),
        ("decompress_method_int", "/decompress", {"instance_id": "inst_single", "method": 1, "location": CPU}),
        ("move_missing_all", "/move", {}),
        ("move_position_string", "/move", {"old_position": "inst_single", "new_position": ["inst_tp2", CPU]}),
        (
            "move_position_three_items",
            "/move",
            {"old_position": ["inst_single", CPU, "x"], "new_position": ["inst_tp2", CPU]},
        ),
        (
            "move_should_copy_maybe",
            "/move",
            {"old_position": ["inst_single", CPU], "new_position": ["inst_tp2", CPU], "should_copy": "maybe"},
        ),
        ("health_missing_instance", "/health", {}),
        ("health_instance_id_null", "/health", {"instance_id": None}),
        ("check_finish_missing_event", "/check_finish", {}),
        ("check_finish_event_id_int", "/check_finish", {"event_id": 5}),
        ("query_worker_info_missing_instance", "/query_worker_info", {}),
        ("query_worker_info_worker_ids_string", "/query_worker_info", {"instance_id": "inst_tp2", "worker_ids": "0"}),
        (
            "query_worker_info_worker_ids_bad_item",
            "/query_worker_info",
            {"instance_id": "inst_tp2", "worker_ids": ["a"]},
        ),
        ("query_instance_missing_all", "/query_instance", {}),
        ("query_instance_missing_event_id", "/query_instance", {"ip": "127.0.0.1"}),
        ("query_instance_ip_int", "/query_instance", {"event_id": "e", "ip": 127}),
    ]
    for name, path, body in cases:
        rec.post(name, path, body)


def record_coercions(rec: Recorder) -> None:
    """Inputs pydantic's lax mode may convert; each is recorded whichever way it goes."""
    rec.post("coerce_tokens_numeric_strings_and_floats", "/lookup", {"tokens": ["128000", 849.0, *SEED_PROMPT[2:]]})
    rec.post("coerce_tokens_bools", "/lookup", {"tokens": [True, False]})
    rec.post("coerce_tokens_float_string", "/lookup", {"tokens": ["1.0"]})
    rec.post("coerce_instance_id_int", "/health", {"instance_id": 5})
    rec.post("coerce_instance_id_int_clear", "/clear", {"instance_id": 5, "location": CPU})
    rec.post("coerce_worker_ids_string", "/query_worker_info", {"instance_id": "inst_tp2", "worker_ids": "0"})
    rec.post("coerce_worker_ids_string_items", "/query_worker_info", {"instance_id": "inst_tp2", "worker_ids": ["1"]})
    rec.post("coerce_worker_ids_int", "/query_worker_info", {"instance_id": "inst_tp2", "worker_ids": 0})
    move = {"old_position": ["inst_single", CPU], "new_position": ["inst_tp2", CPU]}
    for value in ("true", "yes", "on", 1, "1"):
        rec.post(f"coerce_should_copy_{value!r}", "/move", {**move, "should_copy": value}, "past validation: 500")
    rec.post("coerce_event_id_int", "/query_instance", {"event_id": 5, "ip": "127.0.0.1"})


def record_queries(rec: Recorder) -> None:
    rec.post("query_worker_info_all_stale_cache", "/query_worker_info", {"instance_id": "all"}, "see note_all_cache")
    rec.post("query_worker_info_instance", "/query_worker_info", {"instance_id": "inst_tp2"})
    rec.post(
        "query_worker_info_instance_null_ids", "/query_worker_info", {"instance_id": "inst_tp2", "worker_ids": None}
    )
    rec.post("query_worker_info_worker_1", "/query_worker_info", {"instance_id": "inst_tp2", "worker_ids": [1]})
    rec.post("query_worker_info_unknown_worker", "/query_worker_info", {"instance_id": "inst_tp2", "worker_ids": [7]})
    rec.post("query_worker_info_empty_ids", "/query_worker_info", {"instance_id": "inst_tp2", "worker_ids": []})
    rec.post("query_worker_info_unknown_instance", "/query_worker_info", {"instance_id": "nope"})
    rec.post("query_instance_hit", "/query_instance", {"event_id": "x", "ip": "127.0.0.1"}, "first-registered instance")
    rec.post("query_instance_unknown_ip", "/query_instance", {"event_id": "x", "ip": "203.0.113.7"})
    rec.post("health_tp2", "/health", {"instance_id": "inst_tp2"})
    rec.post("health_single", "/health", {"instance_id": "inst_single"})
    rec.post("health_unknown_instance", "/health", {"instance_id": "nope"})
    rec.post("check_finish", "/check_finish", {"event_id": "Clear00000000-0000-0000-0000-000000000000"})
    rec.get("key_stats", "/controller/key-stats", "TP=2: rank 0 holds 4 chunks, rank 1 none; inst_single 3")
    rec.get("workers_all_stale_cache", "/controller/workers", "see note_all_cache")
    rec.get("workers_instance_tp2", "/controller/workers?instance_id=inst_tp2")
    rec.get("workers_rank0", "/controller/workers?instance_id=inst_tp2&worker_id=0")
    rec.get("workers_rank1", "/controller/workers?instance_id=inst_tp2&worker_id=1")
    rec.get("workers_unknown_instance", "/controller/workers?instance_id=nope")
    rec.get("workers_unknown_worker", "/controller/workers?instance_id=inst_tp2&worker_id=7")
    rec.get("workers_unknown_instance_and_worker", "/controller/workers?instance_id=nope&worker_id=0")
    rec.get("workers_worker_id_only", "/controller/workers?worker_id=1", "worker_id without instance_id: all workers")
    rec.get("workers_worker_id_not_int", "/controller/workers?instance_id=inst_tp2&worker_id=abc")
    rec.get("workers_unknown_param", "/controller/workers?instance=inst_tp2", "an unknown parameter is ignored")


def record_clears(rec: Recorder, controller: harness.Controller) -> None:
    """Clears first, while nothing is pinned (0.5.6 has no unpin: a pin lasts as long as the engine)."""
    single, tp2 = "inst_single", "inst_tp2"
    rec.post("clear_unknown_instance", "/clear", {"instance_id": "nope", "location": CPU})
    rec.post("clear_unknown_location", "/clear", {"instance_id": single, "location": "NoSuchBackend"})
    rec.post(
        "clear_tp2_ranks_disagree", "/clear", {"instance_id": tp2, "location": CPU}, "rank 0 cleared 612, rank 1 had 0"
    )
    harness.wait_for(lambda: key_count(controller) == 3, WAIT_S, "rank 0's evicts")
    rec.post("lookup_after_clear_tp2", "/lookup", {"tokens": RANGE_PROMPT}, "inst_single still holds it")
    rec.post("lookup_seed_after_clear_tp2", "/lookup", {"tokens": SEED_PROMPT})
    rec.post("clear_tp2_again", "/clear", {"instance_id": tp2, "location": CPU}, "both ranks now report 0")
    rec.post("clear_single", "/clear", {"instance_id": single, "location": CPU})
    harness.wait_for(lambda: key_count(controller) == 0, WAIT_S, "inst_single's evicts")
    rec.post("lookup_after_clears", "/lookup", {"tokens": RANGE_PROMPT})
    rec.get("key_stats_after_clears", "/controller/key-stats")


def record_commands(rec: Recorder) -> None:
    """Pin, compress, decompress and move, on chunks stored anew after the clears."""
    single, tp2 = "inst_single", "inst_tp2"
    rec.post("pin_single", "/pin", {"instance_id": single, "location": CPU, "tokens": RANGE_PROMPT})
    rec.post("pin_tp2_ranks_disagree", "/pin", {"instance_id": tp2, "location": CPU, "tokens": SEED_PROMPT})
    rec.post("pin_unknown_instance", "/pin", {"instance_id": "nope", "location": CPU, "tokens": SEED_PROMPT})
    rec.post("pin_empty_tokens", "/pin", {"instance_id": single, "location": CPU, "tokens": []})
    rec.post("clear_single_pinned", "/clear", {"instance_id": single, "location": CPU}, "pinned chunks stay")
    compress = {"instance_id": single, "method": "cachegen", "location": CPU}
    rec.post("compress_cachegen_no_tokens", "/compress", compress, "tokens default to [], which compress nothing")
    rec.post("compress_cachegen_tokens_null", "/compress", {**compress, "tokens": None})
    rec.post("compress_cachegen_range", "/compress", {**compress, "tokens": RANGE_PROMPT})
    rec.post("lookup_after_compress", "/lookup", {"tokens": RANGE_PROMPT})
    rec.post("decompress_cachegen_range", "/decompress", {**compress, "tokens": RANGE_PROMPT})
    rec.post("compress_unknown_method", "/compress", {**compress, "method": "zlib", "tokens": RANGE_PROMPT})
    rec.post(
        "compress_unknown_location", "/compress", {**compress, "location": "NoSuchBackend", "tokens": RANGE_PROMPT}
    )
    rec.post("compress_unknown_instance", "/compress", {**compress, "instance_id": "nope"})
    rec.post("compress_tp2_ranks_disagree", "/compress", {**compress, "instance_id": tp2, "tokens": RANGE_PROMPT})
    rec.post("decompress_unknown_instance", "/decompress", {**compress, "instance_id": "nope"})
    move = {"old_position": [single, CPU], "new_position": [tp2, CPU], "tokens": RANGE_PROMPT, "should_copy": True}
    rec.post("move_without_p2p", "/move", move)
    rec.post("move_unknown_instance", "/move", {**move, "old_position": ["nope", CPU]})


def store_all(engines: dict[str, Any], controller: harness.Controller) -> None:
    harness.store(engines["tp2_rank0"], SEED_PROMPT)
    harness.store(engines["tp2_rank0"], RANGE_PROMPT)
    harness.store(engines["single"], RANGE_PROMPT)
    harness.wait_for(lambda: key_count(controller) == 7, WAIT_S, "7 admitted chunks")


def metric_names(text: str) -> list[str]:
    return sorted({m.group(1) for m in re.finditer(r"^# TYPE (\S+) ", text, re.MULTILINE)})


def main() -> None:
    harness.quiet_lmcache_logs()
    harness.require_lmcache_venv()
    with harness.running_controller() as controller:
        rec = Recorder(controller.url)
        rec.get("key_stats_empty", "/controller/key-stats")
        rec.get("workers_empty", "/controller/workers")
        rec.post("query_worker_info_all_empty", "/query_worker_info", {"instance_id": "all"})
        cache_filled = time.monotonic()  # both "all" forms cached an empty list just now
        with fleet(controller) as engines:
            store_all(engines, controller)
            record_lookups(rec)
            record_body_errors(rec)
            record_field_errors(rec)
            record_coercions(rec)
            record_queries(rec)
            record_clears(rec, controller)
            store_all(engines, controller)
            record_commands(rec)
            time.sleep(max(0.0, cache_filled + CACHE_TTL_S + 1 - time.monotonic()))
            rec.post("query_worker_info_all", "/query_worker_info", {"instance_id": "all"}, "after the 30 s cache")
            rec.get("workers_all", "/controller/workers", "after the 30 s cache")
            metrics = rec.get("metrics", "/metrics")
            metrics["metric_names"] = metric_names(str(metrics["response"]))
        time.sleep(2.0)  # ample for a DeRegisterMsg to arrive, had one been sent
        note = "after every engine was closed: LMCacheWorker.close() never delivers its DeRegisterMsg"
        rec.get("workers_after_engines_closed", "/controller/workers?instance_id=inst_single", note)
        note = "the worker's REP socket is gone and the controller's REQ round trip has no timeout"
        rec.post_unanswered("health_after_engines_closed", "/health", {"instance_id": "inst_single"}, 5.0, note)
    harness.write_json(OUT, rec.records)
    print(f"wrote {len(rec.records)} answers to {OUT}")


if __name__ == "__main__":
    main()
