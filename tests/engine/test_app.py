"""The reference engine in process, with its agent on a real redis-server: routes, streaming, reuse and errors.

What one module does alone (parsing a field, sampling, the chunk layout) is tested beside that module;
here each behaviour is checked once through HTTP, with the agent's index in Redis as the witness.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from starlette.testclient import TestClient

from kvbus.engine import app, protocol
from kvbus.engine.model import ModelShape, TinyLlama
from kvbus.shared import keys
from kvbus.shared.config import KVBusConfig
from kvbus.shared.locations import Location
from tests.conftest import MODEL, SEED_TEXT, SEED_TOKENS
from tests.engine.conftest import LONG, SHAPE

INSTANCE = "engine-under-test"


@pytest.fixture
def client(redis_url: str, model: TinyLlama, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    def built(shape: ModelShape, seed: int) -> TinyLlama:
        # Every app here builds the same weights; the session's copy spares each test a second of building.
        assert (shape, seed) == (SHAPE, 0)
        return model

    monkeypatch.setattr(app, "build_model", built)
    config = KVBusConfig(
        enable_controller=True, redis_url=redis_url, lmcache_instance_id=INSTANCE, heartbeat_interval=0.1
    )
    with TestClient(app.create_app(config, MODEL, shape=SHAPE)) as test_client:
        yield test_client


def complete(client: TestClient, prompt: Any, **extra: Any) -> dict[str, Any]:
    response = client.post(
        "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0, **extra}
    )
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def indexed(redis_url: str) -> dict[str, str]:
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        return client.hgetall(keys.index(INSTANCE, 0, Location.CPU))  # type: ignore[return-value]


def test_completion_has_openai_shape_and_seed_prompt_is_held(client: TestClient, redis_url: str) -> None:
    body = complete(client, SEED_TEXT, max_tokens=10)
    assert body["object"] == "text_completion" and body["model"] == MODEL and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in ("length", "stop") and isinstance(choice["text"], str)
    assert body["usage"] == {
        "prompt_tokens": 12,
        "completion_tokens": 10,
        "total_tokens": 22,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert sorted(int(n) for n in indexed(redis_url).values()) == [12]


def test_repeat_reuses_all_but_one_token_and_gives_the_same_logprobs(client: TestClient, redis_url: str) -> None:
    cold = complete(client, LONG, logprobs=3)
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert sorted(int(n) for n in indexed(redis_url).values()) == [88, 256, 256]
    warm = complete(client, LONG, logprobs=3)
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] == 599
    cold_lp, warm_lp = cold["choices"][0]["logprobs"], warm["choices"][0]["logprobs"]
    assert warm_lp["tokens"] == cold_lp["tokens"] and warm["choices"][0]["text"] == cold["choices"][0]["text"]
    assert warm_lp["token_logprobs"] == pytest.approx(cold_lp["token_logprobs"], abs=1e-4)
    assert all(len(top) >= 3 for top in warm_lp["top_logprobs"])
    assert warm_lp["text_offset"][0] == 0 and len(warm_lp["text_offset"]) == 4


def test_a_batch_of_prompts_gives_one_choice_each(client: TestClient) -> None:
    body = complete(client, [SEED_TEXT, SEED_TOKENS])
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["text"] == body["choices"][1]["text"]  # the text and its ids are one prompt
    assert body["usage"]["prompt_tokens"] == 24 and body["usage"]["prompt_tokens_details"]["cached_tokens"] == 11


def test_streaming_sends_the_same_text_in_pieces_then_usage_and_done(client: TestClient) -> None:
    whole = complete(client, SEED_TEXT, max_tokens=12)
    with client.stream(
        "POST",
        "/v1/completions",
        json={
            "model": MODEL,
            "prompt": SEED_TEXT,
            "max_tokens": 12,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    pieces = [e["choices"][0]["text"] for e in events if e["choices"] and e["choices"][0]["finish_reason"] is None]
    assert len(pieces) > 1 and "".join(pieces) == whole["choices"][0]["text"]
    assert events[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 11
    assert len({e["id"] for e in events}) == 1


def test_streaming_holds_back_text_until_it_cannot_begin_a_stop_string(client: TestClient) -> None:
    greedy = complete(client, SEED_TEXT, max_tokens=8)["choices"][0]["text"]
    stop = greedy[5:9]
    with client.stream(
        "POST",
        "/v1/completions",
        json={"prompt": SEED_TEXT, "max_tokens": 8, "temperature": 0, "stream": True, "stop": stop},
    ) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line and line != "data: [DONE]"]
    text = "".join(e["choices"][0]["text"] for e in events)
    assert text == greedy[: greedy.index(stop)] and stop not in text
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_tokenize_models_and_health(client: TestClient) -> None:
    tokens = client.post("/tokenize", json={"model": MODEL, "prompt": SEED_TEXT}).json()
    assert tokens == {"count": 12, "max_model_len": 1024, "tokens": SEED_TOKENS, "token_strs": None}
    bare = client.post("/tokenize", json={"prompt": "Hello, world!", "add_special_tokens": False}).json()
    assert bare["tokens"] == [9906, 11, 1917, 0]
    assert client.post("/detokenize", json={"tokens": [9906, 11, 1917, 0]}).json() == {"prompt": "Hello, world!"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("tokens", [[-1], [128256], [1, 2**64]])
def test_detokenize_refuses_ids_outside_the_vocabulary(client: TestClient, tokens: list[int]) -> None:
    response = client.post("/detokenize", json={"tokens": tokens})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "tokens" and "ids run from 0 to 128255 (vocabulary size 128256)" in error["message"]


@pytest.mark.parametrize(
    ("body", "status", "param", "phrase"),
    [
        # One refusal from each step the server takes; test_protocol covers every field's refusals.
        ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens", "Expected `int | null`"),
        ({"prompt": "x", "model": "gpt-4"}, 404, "model", "`gpt-4` does not exist"),
        ({"prompt": "x", "temperature": -1}, 400, "temperature", "[0, 2]"),
        ({"prompt": "x", "seed": 18446744073709551616}, 400, "seed", "signed 64-bit integer"),
        ({"prompt": ""}, 400, "prompt", "must not be empty"),
        # The server's own checks, which need the model's vocabulary and context length.
        ({"prompt": [128256]}, 400, "prompt", "vocabulary size 128256"),
        ({"prompt": [[1], [-1]]}, 400, "prompt", "token id -1 is outside the vocabulary"),
        ({"prompt": list(range(1020)), "max_tokens": 10}, 400, "max_tokens", "maximum context length is 1024"),
        ({"prompt": list(range(1030))}, 400, "prompt", "maximum context length is 1024"),
    ],
)
def test_bad_requests_get_openai_errors_and_lose_nothing(
    client: TestClient, redis_url: str, body: dict[str, Any], status: int, param: str, phrase: str
) -> None:
    complete(client, SEED_TEXT)
    held = indexed(redis_url)
    response = client.post("/v1/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert phrase in error["message"] and error["param"] == param and error["code"] == status
    assert error["type"] == ("NotFoundError" if status == 404 else "BadRequestError")
    assert indexed(redis_url) == held
    assert complete(client, SEED_TEXT)["usage"]["prompt_tokens_details"]["cached_tokens"] == 11


def test_malformed_and_oversized_bodies(client: TestClient) -> None:
    response = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    response = client.post("/v1/completions", json=["a list"])
    assert response.status_code == 400 and "JSON object" in response.json()["error"]["message"]
    response = client.post("/v1/completions", content=b"x" * (5 * 1024 * 1024))
    assert response.status_code == 413
    response = client.get("/v1/completions")
    assert response.status_code == 405 and response.json()["error"]["code"] == 405
    assert client.get("/nowhere").json()["error"]["type"] == "NotFoundError"


@pytest.mark.parametrize("path", ["/v1/completions", "/tokenize", "/detokenize"])
def test_deeply_nested_bodies_are_refused_on_every_endpoint(client: TestClient, path: str) -> None:
    deep = b'{"prompt": "x", "tokens": [1], "extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = client.post(path, content=deep, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"] == {
        "message": f"request body is nested 100001 levels deep; at most {protocol.MAX_DEPTH} are accepted",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }


@pytest.mark.parametrize("path", ["/v1/completions", "/tokenize", "/detokenize"])
def test_a_body_sent_without_a_length_is_cut_off_at_the_limit(client: TestClient, path: str) -> None:
    """A chunked body is read only as far as the limit (TestClient sends whole bodies, so this speaks ASGI)."""
    piece, pieces = 64 * 1024, 1024  # 64 MiB offered, 16 times the limit
    pulled = 0

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b" " * piece, "more_body": pulled < pieces}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    client.portal.call(client.app, scope, receive, send)
    assert sent[0]["status"] == 413
    assert "exceeds 4194304 bytes" in json.loads(sent[1]["body"])["error"]["message"]
    assert pulled * piece <= app.MAX_BODY_BYTES + piece
