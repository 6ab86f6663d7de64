"""Property: no body a client can send gets a 5xx from the engine, and every refusal is OpenAI's error JSON.

Bodies are valid ones with at most one field made wrong (a refused value of its type, any JSON, or
left out), any JSON, or any bytes. Valid requests stay cheap (short prompts, at most 3 tokens
generated): a max_tokens from 4 up to the context length, or none (16), is the one value never
drawn, since it is only slower.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from kvbus.engine import app, protocol
from kvbus.engine.model import ModelShape, TinyLlama
from kvbus.shared.config import KVBusConfig
from tests.conftest import MODEL, RedisServer
from tests.engine.conftest import SHAPE

FUZZ = settings(
    max_examples=300,
    deadline=None,  # a completion runs the model; its time says nothing here
    derandomize=True,  # the same bodies on every run, so CI never finds a new one by chance
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8)
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
)


def outside(low: int, high: int) -> st.SearchStrategy[int]:
    return st.sampled_from([low - 1, high + 1]) | st.integers(max_value=low - 1) | st.integers(min_value=high + 1)


Fields = dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]]  # name: (accepted values, refused ones)


@st.composite
def bodies(draw: st.DrawFn, fields: Fields, required: str, always: tuple[str, ...] = ()) -> dict[str, Any]:
    """A body of accepted values, then at most one field made wrong: refused, any JSON, or (the
    required one) left out. One wrong field at a time, so that each gets past every other check to its own.

    `always` are drawn in every body, where leaving them out would be valid but slow.
    """
    body = {
        name: draw(valid)
        for name, (valid, _) in fields.items()
        if name == required or name in always or draw(st.booleans())
    }
    broken = draw(st.none() | st.sampled_from(sorted(fields)))
    if broken is not None:
        wrong = draw(st.sampled_from(["refused", "any", "absent"] if broken == required else ["refused", "any"]))
        if wrong == "absent":
            del body[broken]
        else:
            body[broken] = draw(fields[broken][1] if wrong == "refused" else json_values)
    return body


VOCAB = SHAPE.vocab_size
token_lists = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6)
bad_token_lists = st.tuples(token_lists, outside(0, VOCAB - 1), st.integers(0, 6)).map(
    lambda drawn: [*drawn[0][: drawn[2]], drawn[1], *drawn[0][drawn[2] :]]  # one id outside, anywhere
)
models = (st.just(MODEL), st.text(max_size=8).filter(lambda name: name != MODEL))
completions = bodies(
    {
        "prompt": (
            st.text(min_size=1, max_size=24)
            | token_lists
            | st.lists(st.text(min_size=1) | token_lists, min_size=1, max_size=3),
            st.just("") | st.just([]) | bad_token_lists | st.lists(bad_token_lists, min_size=1, max_size=2),
        ),
        "model": models,
        # Accepted only up to 3 (and never left out: 16 by default), so that valid bodies stay quick.
        "max_tokens": (st.integers(1, 3), outside(1, SHAPE.max_model_len - 1)),
        "temperature": (st.floats(0, 2), st.floats().filter(lambda t: not 0 <= t <= 2)),
        "top_p": (st.floats(0, 1, exclude_min=True), st.floats().filter(lambda p: not 0 < p <= 1)),
        "n": (st.just(1), outside(1, 1)),
        "stream": (st.booleans(), st.integers() | st.text()),
        "logprobs": (st.integers(0, protocol.MAX_LOGPROBS), outside(0, protocol.MAX_LOGPROBS)),
        "echo": (st.just(False), st.just(True)),
        "stop": (st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=3), st.lists(st.integers(), min_size=1)),
        "seed": (st.integers(protocol.SEED_MIN, protocol.SEED_MAX), outside(protocol.SEED_MIN, protocol.SEED_MAX)),
        "stream_options": (st.fixed_dictionaries({"include_usage": st.booleans()}), st.just({"include_usage": 1})),
    },
    required="prompt",
    always=("max_tokens",),
)
tokenizes = bodies(
    {
        "prompt": (st.text(max_size=24), st.integers() | st.lists(st.text())),
        "model": models,
        "add_special_tokens": (st.booleans(), st.integers() | st.text()),
    },
    required="prompt",
)
detokenizes = bodies({"tokens": (token_lists, bad_token_lists), "model": models}, required="tokens")


@pytest.fixture(scope="module")
def client(redis_server: RedisServer, model: TinyLlama) -> Iterator[TestClient]:
    def built(shape: ModelShape, seed: int) -> TinyLlama:
        assert (shape, seed) == (SHAPE, 0)
        return model

    config = KVBusConfig(enable_controller=True, redis_url=redis_server.url, lmcache_instance_id="engine-fuzzed")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(app, "build_model", built)
        with TestClient(app.create_app(config, MODEL, shape=SHAPE), raise_server_exceptions=False) as test_client:
            yield test_client


def check(client: TestClient, path: str, body: bytes) -> None:
    with client.stream("POST", path, content=body, headers={"content-type": "application/json"}) as response:
        content = response.read()
    assert response.status_code < 500, content
    if response.status_code >= 400:
        error = json.loads(content)["error"]
        assert error["code"] == response.status_code and isinstance(error["message"], str) and error["message"]
        assert error["param"] is None or isinstance(error["param"], str)


@FUZZ
@given(body=completions | json_values)
def test_completions_never_answer_5xx(client: TestClient, body: Any) -> None:
    check(client, "/v1/completions", json.dumps(body).encode())


@FUZZ
@given(body=tokenizes | json_values)
def test_tokenize_never_answers_5xx(client: TestClient, body: Any) -> None:
    check(client, "/tokenize", json.dumps(body).encode())


@FUZZ
@given(body=detokenizes | json_values)
def test_detokenize_never_answers_5xx(client: TestClient, body: Any) -> None:
    check(client, "/detokenize", json.dumps(body).encode())


@FUZZ
@given(path=st.sampled_from(["/v1/completions", "/tokenize", "/detokenize"]), body=st.binary(max_size=64))
def test_arbitrary_bytes_never_get_a_5xx(client: TestClient, path: str, body: bytes) -> None:
    check(client, path, body)
