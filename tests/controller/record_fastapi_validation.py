"""Record how LMCache 0.5.6's app reads request bodies: FastAPI's answer to many valid, coercible and bad ones.

Run: .venv-lmcache/bin/python tests/controller/record_fastapi_validation.py   (a few seconds; writes
fastapi_validation.json next to this file, which test_validation.py replays against kvbus's reader).

The request models are LMCache's own classes, taken from the routes of the app its controller builds
(`lmcache.v1.api_server.__main__.create_app`), and `/controller/workers` is LMCache's own route. They are
mounted on a FastAPI app of the venv's version (0.141) whose handlers echo the validated model
(`model_dump(mode="json")`), so an accepted body records what pydantic converted it to and a refused one
FastAPI's own 422 (or 400). `/controller/workers` is LMCache's handler itself: without LMCache's
controller manager behind it, a query it accepts is answered 503. Nothing reaches a worker. Each record:
path, method, content_type (null: no header), body (text) or body_hex (bytes that are not UTF-8), or
query, then status and response (parsed JSON).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

# This folder holds kvbus's tests/controller/lmcache package, which would hide LMCache's own.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

OUT = Path(__file__).with_name("fastapi_validation.json")
JSON = "application/json"
CPU = "LocalCPUBackend"

INTS: list[Any] = [
    *(1, 0, -1, 2**63, 2**64, -(2**63) - 1, 10**30, True, False),
    *(1.0, 1.5, -0.0, 1e20, 9.2e18, 2.0**63, -(2.0**63), 1e-300),
    *("12", " 12 ", "1_000", "+5", "-5", "-0", "1.0", "1.000", "-0.0", "1.5", "1e3", "0x10", "0b1", "0o7"),
    *("", " ", "00012", "1.", ".0", "0_", "_0", "1__0", "0_1", "00_1", "1_0.0", "1.0_0", "+-1", "+", "-"),
    *("\u0663", "\uff11\uff12", "\u00a012", "\u200312", "\x1c12", "12\x1f", "\t5\n", "1 2", "- 1", "NaN", "inf"),
    *(None, [], {}, [1], {"a": 1}, "1" + ".0" * 3),
]
LONG_INTS: list[Any] = [  # around pydantic-core's 4300-digit limit: only in /lookup's tokens, for the file's size
    *("9" * 4300, "9" * 4301, "-" + "9" * 4300, "-" + "9" * 4301, "0" * 5000 + "1", "a" * 4301),
    *("1." + "0" * 5000, "9" * 4299 + "_9", "9" * 4300 + "_9", " " * 10 + "9" * 4300),
]
BOOLS: list[Any] = [
    *(True, False, 0, 1, 2, -1, 0.0, 1.0, 2.0, 0.5, -0.0, 10**30, 2**63 - 1, 2**63, -(2**63), 9e18, 1e19, 1e30),
    *("true", "True", "TRUE", "tRuE", " yes", "yes ", "y", "Y", "t", "f", "n", "on", "ON", "off", "1", "0"),
    *("2", "1.0", "maybe", "", "\uff34\uff32\uff35\uff25", "\u0130", "no", "No"),
    *(None, [], {}),
]
STRS: list[Any] = ["x", "", " ", "\u00e9", 5, 5.0, True, None, [], {}, ["x"], {"x": 1}]
LISTS: list[Any] = [[], [1], [1, 2, 3], "x", "", {"0": 1}, {}, None, 5, True, [1, "x", None, 1.5, True, [], "2"]]
TUPLES: list[Any] = [
    *(["a", "b"], ["a"], [], ["a", "b", "c"], ["a", "b", "c", "d"], "ab", {"a": 1}, ["a", 1]),
    *([None, None], None, [["a"], "b"], 5, [1, 2, 3]),
]

BASE: dict[str, dict[str, Any]] = {
    "/lookup": {"tokens": [1, 2, 3]},
    "/clear": {"instance_id": "i", "location": CPU},
    "/pin": {"instance_id": "i", "location": CPU, "tokens": [1, 2]},
    "/compress": {"instance_id": "i", "method": "cachegen", "location": CPU, "tokens": [1]},
    "/decompress": {"instance_id": "i", "method": "cachegen", "location": CPU},
    "/move": {"old_position": ["a", CPU], "new_position": ["b", CPU], "tokens": [1], "should_copy": True},
    "/health": {"instance_id": "i"},
    "/check_finish": {"event_id": "e"},
    "/query_worker_info": {"instance_id": "i", "worker_ids": [0]},
    "/query_instance": {"event_id": "e", "ip": "127.0.0.1"},
}
POOLS: dict[str, list[Any]] = {
    "tokens": [[v] for v in INTS] + LISTS,
    "worker_ids": [[v] for v in INTS] + LISTS,
    "should_copy": BOOLS,
    "old_position": TUPLES,
    "new_position": [["b", v] for v in STRS],
}
RAW_BODIES: list[tuple[str | None, str | bytes]] = [
    *((JSON, b) for b in ("", "null", "[]", "[1, 2]", '"x"', "7", "7.5", "true", "{}", "{", "{]", "{'a': 1}")),
    *((JSON, b) for b in ('{"tokens": [1, 2', "{instance_id: x}", '{"a": 1} x', " ", "\n", "NaN", "[1,]")),
    *((JSON, b) for b in ('{"tokens": [1], "tokens": "x"}', '{"tokens": NaN}', '{"tokens": [Infinity, -Infinity]}')),
    *((JSON, b) for b in ('{"tokens": [1e400]}', '{"tokens": [' + "9" * 5000 + "]}", "[" * 3000 + "]" * 3000)),
    *((JSON, b) for b in (b"\xff\xfe", b"\xef\xbb\xbf{}", '{"tokens": [1]}'.encode("utf-16"), b'{"tokens": "\xff"}')),
    *((JSON, b) for b in (b'{"tokens": [1]}\x00', '{"tokens": ["\\ud800"]}', '{"tokens": [1]}\n\n')),
    *((t, '{"tokens": [1]}') for t in (None, "text/plain", "application/x-www-form-urlencoded", "text/json")),
    *(
        (t, '{"tokens": [1]}')
        for t in ("application/vnd.api+json", "application/json; charset=utf-8", "APPLICATION/JSON")
    ),
    *((t, '{"tokens": [1]}') for t in ("application/jsonx", "application/json-patch+json", "application", "")),
    *((t, "") for t in (None, "text/plain")),
]
QUERIES = [
    *("worker_id=abc", "worker_id=1", "worker_id=%201%20", "worker_id=1.0", "worker_id=-1", "worker_id="),
    *("worker_id=1.5", "worker_id=%D9%A3", "worker_id=1_0", "worker_id=1&worker_id=x", "worker_id=x&worker_id=1"),
    *("instance_id=i&worker_id=x", "instance_id=", "instance_id=i&instance_id=j", "worker_id=" + "9" * 4301),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def lmcache_models() -> tuple[dict[str, type[Any]], Any]:
    """LMCache's request model for each POST path, and its /controller/workers handler."""
    os.environ.setdefault("LMCACHE_LOG_LEVEL", "WARNING")
    from lmcache.v1.api_server.__main__ import create_app
    from lmcache.v1.internal_api_server.controller.worker_info_api import get_workers

    urls = {name: f"127.0.0.1:{_free_port()}" for name in ("pull", "reply", "heartbeat")}
    app = create_app(urls, 1, 1)  # no lifespan runs: nothing is started or contacted
    models: dict[str, type[Any]] = {}
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path in BASE and route.body_field is not None:
            models[route.path] = route.body_field.field_info.annotation
    missing = set(BASE) - set(models)
    if missing:
        sys.exit(f"LMCache's app lacks {sorted(missing)}")
    return models, get_workers


def echo_app(models: dict[str, type[Any]], workers: Any) -> FastAPI:
    app = FastAPI()
    for path, model in models.items():

        async def echo(req: Any) -> Any:
            return req.model_dump(mode="json")

        echo.__annotations__["req"] = model
        app.post(path)(echo)

    app.get("/controller/workers")(workers)
    return app


def cases() -> list[tuple[str, str | None, str | bytes]]:
    listed: list[tuple[str, str | None, str | bytes]] = []
    for path, base in BASE.items():
        listed.append((path, JSON, json.dumps(base)))
        listed.append((path, JSON, json.dumps({**base, "unknown": 1})))
        for name in base:
            listed.append((path, JSON, json.dumps({k: v for k, v in base.items() if k != name})))
            listed.append((path, JSON, json.dumps({k: v for k, v in base.items() if k == name})))
            for value in POOLS.get(name, STRS) + ([[v] for v in LONG_INTS] if path == "/lookup" else []):
                listed.append((path, JSON, json.dumps({**base, name: value})))
        listed.append((path, JSON, json.dumps({})))
        listed.append((path, JSON, json.dumps({name: None for name in base})))
        listed.append((path, JSON, json.dumps({name: 5 for name in base})))
        if path in ("/lookup", "/clear"):  # what the body as a whole does is the same for every model
            listed += [(path, content_type, body) for content_type, body in RAW_BODIES]
    return listed


def record(client: Any, path: str, content_type: str | None, body: str | bytes) -> dict[str, Any]:
    raw = body.encode() if isinstance(body, str) else body
    headers = {} if content_type is None else {"content-type": content_type}
    response = client.post(path, content=raw, headers=headers)
    entry: dict[str, Any] = {"path": path, "method": "POST", "content_type": content_type}
    try:
        entry["body"] = raw.decode("utf-8")
    except UnicodeDecodeError:
        entry["body_hex"] = raw.hex()
    return entry | {"status": response.status_code, "response": _answer(response)}


def _answer(response: Any) -> Any:
    """The JSON answer, or the text of one that is not JSON (a 500 when FastAPI cannot encode its own error)."""
    try:
        return response.json()
    except ValueError:
        return response.text


def main() -> None:
    logging.disable(logging.WARNING)
    models, workers = lmcache_models()
    client = TestClient(echo_app(models, workers), raise_server_exceptions=False)
    records = [record(client, path, content_type, body) for path, content_type, body in cases()]
    for query in QUERIES:
        response = client.get(f"/controller/workers?{query}")
        records.append(
            {"path": "/controller/workers", "method": "GET", "query": query}
            | {
                "status": response.status_code,
                "response": _answer(response),
            }
        )
    OUT.write_text(json.dumps(records, indent=None, separators=(",", ":")).replace('},{"path"', '},\n{"path"') + "\n")
    statuses: dict[int, int] = {}
    for entry in records:
        statuses[entry["status"]] = statuses.get(entry["status"], 0) + 1
    print(f"wrote {len(records)} answers to {OUT}: {statuses}")


if __name__ == "__main__":
    main()
