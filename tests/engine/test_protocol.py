"""OpenAI's request fields parsed into checked values, every refusal naming its field, and the response shapes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kvbus.engine import protocol
from kvbus.engine.errors import BadRequest, EngineError, ModelNotFound
from kvbus.engine.generator import Completion, SamplingParams
from tests.conftest import MODEL

VOCAB = 1000


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def parse(raw: bytes) -> tuple[SamplingParams, list[str | list[int]]]:
    """A completion request checked in the order the server checks it."""
    request = protocol.decode(raw, protocol.CompletionRequest)
    protocol.check_model(request.model, MODEL)
    return protocol.sampling_params(request), protocol.prompts(request.prompt, VOCAB)


def test_every_sampling_field_reaches_the_sampling_params() -> None:
    params, prompts = parse(
        body(
            prompt="hi",
            model=MODEL,
            max_tokens=7,
            temperature=0.5,
            top_p=0.9,
            n=1,
            stream=False,
            logprobs=2,
            echo=False,
            stop=["\n", "END"],
            seed=42,
        )
    )
    assert params == SamplingParams(max_tokens=7, temperature=0.5, top_p=0.9, seed=42, logprobs=2, stop=("\n", "END"))
    assert prompts == ["hi"]


def test_absent_and_null_fields_take_openai_defaults_and_unknown_ones_are_ignored() -> None:
    defaults = SamplingParams(max_tokens=16, temperature=1.0, top_p=1.0, seed=None, logprobs=None, stop=())
    assert parse(body(prompt="hi"))[0] == defaults
    assert parse(body(prompt="hi", max_tokens=None, temperature=None, top_p=None, stop=None))[0] == defaults
    assert parse(body(prompt="hi", user="someone", frequency_penalty=0.5))[0] == defaults


@pytest.mark.parametrize(
    ("stop", "expected"), [("END", ("END",)), (["a", "b"], ("a", "b")), (["", "b"], ("b",)), ("", ()), ([], ())]
)
def test_stop_is_a_string_or_a_list_and_empty_strings_are_dropped(stop: Any, expected: tuple[str, ...]) -> None:
    assert parse(body(prompt="hi", stop=stop))[0].stop == expected


def test_stream_and_its_usage_option_are_read() -> None:
    request = protocol.decode(
        body(prompt="hi", stream=True, stream_options={"include_usage": True}), protocol.CompletionRequest
    )
    assert request.stream and request.stream_options == protocol.StreamOptions(include_usage=True)
    assert protocol.decode(body(prompt="hi"), protocol.CompletionRequest).stream_options is None


@pytest.mark.parametrize(
    ("fields", "field", "value"),
    [
        ({"max_tokens": 1}, "max_tokens", 1),
        ({"temperature": 0}, "temperature", 0),
        ({"temperature": 2}, "temperature", 2),
        ({"top_p": 1}, "top_p", 1),
        ({"logprobs": 0}, "logprobs", 0),
        ({"logprobs": 20}, "logprobs", 20),
        ({"seed": -(2**63)}, "seed", -(2**63)),
        ({"seed": 2**63 - 1}, "seed", 2**63 - 1),
    ],
)
def test_values_at_the_edges_of_each_range_are_accepted(fields: dict[str, Any], field: str, value: float) -> None:
    assert getattr(parse(body(prompt="hi", **fields))[0], field) == value


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("hi", ["hi"]),
        ([1, 2, 3], [[1, 2, 3]]),
        (["a", "b"], ["a", "b"]),
        (["a", [4, 5]], ["a", [4, 5]]),
        ([[1], [2, 3]], [[1], [2, 3]]),
    ],
)
def test_a_prompt_is_text_token_ids_or_a_batch_of_either(prompt: Any, expected: list[Any]) -> None:
    assert protocol.prompts(prompt, VOCAB) == expected


@pytest.mark.parametrize(
    ("fields", "error", "param", "phrase"),
    [
        ({"prompt": "x", "max_tokens": "many"}, BadRequest, "max_tokens", "Expected `int | null`"),
        ({"max_tokens": 3}, BadRequest, "prompt", "missing required field"),
        ({"prompt": "x", "stop": [1]}, BadRequest, "stop", "Expected `str`"),
        ({"prompt": "x", "stream_options": {"include_usage": "yes"}}, BadRequest, "stream_options", "`bool`"),
        ({"prompt": "x", "n": 1.5}, BadRequest, "n", "Expected `int`"),
        ({"prompt": ""}, BadRequest, "prompt", "must not be empty"),
        ({"prompt": ["x", ""]}, BadRequest, "prompt", "must not be empty"),
        ({"prompt": []}, BadRequest, "prompt", "prompt must be"),
        ({"prompt": [1, "a"]}, BadRequest, "prompt", "prompt must be"),
        ({"prompt": [True]}, BadRequest, "prompt", "prompt must be"),
        ({"prompt": [[1], []]}, BadRequest, "prompt", "prompt must be"),
        ({"prompt": 5}, BadRequest, "prompt", "prompt must be"),
        ({"prompt": [-1]}, BadRequest, "prompt", "token id -1 is outside the vocabulary: ids run from 0 to 999"),
        ({"prompt": [VOCAB]}, BadRequest, "prompt", f"token id {VOCAB} is outside the vocabulary"),
        ({"prompt": [[1], [2**64]]}, BadRequest, "prompt", f"token id {2**64} is outside the vocabulary"),
        ({"prompt": "x", "max_tokens": 0}, BadRequest, "max_tokens", "at least 1"),
        ({"prompt": "x", "temperature": -1}, BadRequest, "temperature", "[0, 2]"),
        ({"prompt": "x", "temperature": 2.5}, BadRequest, "temperature", "[0, 2]"),
        ({"prompt": "x", "top_p": 0}, BadRequest, "top_p", "(0, 1]"),
        ({"prompt": "x", "top_p": 1.5}, BadRequest, "top_p", "(0, 1]"),
        ({"prompt": "x", "logprobs": 21}, BadRequest, "logprobs", "[0, 20]"),
        ({"prompt": "x", "logprobs": -1}, BadRequest, "logprobs", "[0, 20]"),
        ({"prompt": "x", "n": 2}, BadRequest, "n", "n must be 1"),
        ({"prompt": "x", "n": 2**64}, BadRequest, "n", "n must be 1"),
        ({"prompt": "x", "seed": 2**64}, BadRequest, "seed", "signed 64-bit integer"),
        ({"prompt": "x", "seed": 2**63}, BadRequest, "seed", "signed 64-bit integer"),
        ({"prompt": "x", "seed": -(2**63) - 1}, BadRequest, "seed", "signed 64-bit integer"),
        ({"prompt": "x", "seed": 1.5}, BadRequest, "seed", "Expected `int | null`"),
        ({"prompt": "x", "stream": True, "logprobs": 1}, BadRequest, "logprobs", "not streamed"),
        ({"prompt": "x", "echo": True}, BadRequest, "echo", "not supported"),
        ({"prompt": "x", "model": "gpt-4"}, ModelNotFound, "model", "`gpt-4` does not exist"),
    ],
)
def test_bad_fields_are_refused_naming_the_field(
    fields: dict[str, Any], error: type[EngineError], param: str, phrase: str
) -> None:
    with pytest.raises(error) as refused:
        parse(body(**fields))
    assert refused.value.param == param and phrase in refused.value.message
    assert (refused.value.status_code, refused.value.kind) == (
        (404, "NotFoundError") if error is ModelNotFound else (400, "BadRequestError")
    )


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"prompt": "x", "temperature": 1e400}', "temperature"),
        (b'{"prompt": "x", "top_p": -1e400}', "top_p"),
        (b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", "max_tokens"),
        (b'{"prompt": [1' + b"0" * 5000 + b"]}", "prompt"),
    ],
)
def test_numbers_too_large_to_read_are_refused_naming_the_field(raw: bytes, param: str) -> None:
    with pytest.raises(BadRequest, match="out of range") as refused:
        protocol.decode(raw, protocol.CompletionRequest)
    assert refused.value.param == param


@pytest.mark.parametrize(
    ("raw", "phrase"),
    [
        (b"{not json", "not valid JSON"),
        (b'["a list"]', "JSON object"),
        (b'"text"', "JSON object"),
        (b"", "not valid JSON"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_refused_without_a_param(raw: bytes, phrase: str) -> None:
    with pytest.raises(BadRequest, match=phrase) as refused:
        protocol.decode(raw, protocol.CompletionRequest)
    assert refused.value.param is None


def nested(depth: int) -> bytes:
    """A completion request whose ignored `extra` field holds lists `depth` levels deep, counting the body's object."""
    return b'{"prompt": "hi", "extra": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def test_a_body_nested_up_to_the_limit_is_read() -> None:
    assert protocol.decode(nested(protocol.MAX_DEPTH), protocol.CompletionRequest).prompt == "hi"


@pytest.mark.parametrize(
    "raw",
    [
        nested(protocol.MAX_DEPTH + 1),
        b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b"[" * 100_000,  # unclosed: a parser recurses before it finds the body truncated
        b'{"prompt": "x", "extra": ' + b'{"a": ' * 5_000 + b"1" + b"}" * 5_000 + b"}",
    ],
    ids=["one-past-the-limit", "deep-prompt", "unclosed", "deep-objects"],
)
def test_a_body_nested_too_deep_is_refused_before_it_is_parsed(raw: bytes) -> None:
    with pytest.raises(BadRequest, match=f"at most {protocol.MAX_DEPTH} are accepted") as refused:
        protocol.decode(raw, protocol.CompletionRequest)
    assert refused.value.param is None


@pytest.mark.parametrize(
    "prompts",
    [["[" * 1000], ['\\"' + "[" * 1000], ["\\\\", "[" * 1000], ["{" * 500 + "}" * 1000]],
    ids=["brackets", "after-an-escaped-quote", "after-a-string-ending-in-a-backslash", "unbalanced"],
)
def test_brackets_inside_strings_are_not_nesting(prompts: list[str]) -> None:
    raw = ('{"prompt": [' + ", ".join(f'"{p}"' for p in prompts) + "]}").encode()
    assert protocol.decode(raw, protocol.CompletionRequest).prompt == json.loads(raw)["prompt"]


def test_tokenize_and_detokenize_requests_are_read() -> None:
    tokenize = protocol.decode(body(prompt="hi", add_special_tokens=False), protocol.TokenizeRequest)
    assert (tokenize.prompt, tokenize.add_special_tokens, tokenize.model) == ("hi", False, None)
    assert protocol.decode(body(prompt="hi"), protocol.TokenizeRequest).add_special_tokens
    assert protocol.decode(body(tokens=[1, 2], model=MODEL), protocol.DetokenizeRequest).tokens == [1, 2]


@pytest.mark.parametrize(
    ("kind", "fields", "param"),
    [
        (protocol.TokenizeRequest, {"prompt": 5}, "prompt"),
        (protocol.DetokenizeRequest, {}, "tokens"),
        (protocol.DetokenizeRequest, {"tokens": ["a"]}, "tokens"),
    ],
)
def test_bad_tokenize_and_detokenize_requests_name_the_field(kind: type, fields: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as refused:
        protocol.decode(body(**fields), kind)
    assert refused.value.param == param


def test_token_ids_to_detokenize_must_be_in_the_vocabulary() -> None:
    protocol.check_token_ids([0, VOCAB - 1], VOCAB, "tokens")
    with pytest.raises(BadRequest, match="token id -1 is outside") as refused:
        protocol.check_token_ids([5, -1, VOCAB], VOCAB, "tokens")
    assert refused.value.param == "tokens"


def test_the_served_model_or_none_is_accepted() -> None:
    protocol.check_model(None, MODEL)
    protocol.check_model(MODEL, MODEL)
    with pytest.raises(ModelNotFound, match=f"this engine serves `{MODEL}`"):
        protocol.check_model(MODEL.lower(), MODEL)


def completion(**fields: Any) -> Completion:
    return Completion(**{"prompt_tokens": 5, "cached_tokens": 2, "token_ids": [1, 2, 3], "text": "abc", **fields})


def test_a_completion_response_has_one_choice_per_prompt_and_summed_usage() -> None:
    response = protocol.completion_response(MODEL, [completion(), completion(cached_tokens=4, finish_reason="stop")])
    assert response["object"] == "text_completion" and response["model"] == MODEL
    assert response["id"].startswith("cmpl-") and isinstance(response["created"], int)
    assert response["choices"] == [
        {"index": 0, "text": "abc", "logprobs": None, "finish_reason": "length", "stop_reason": None},
        {"index": 1, "text": "abc", "logprobs": None, "finish_reason": "stop", "stop_reason": None},
    ]
    assert response["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 6,
        "total_tokens": 16,
        "prompt_tokens_details": {"cached_tokens": 6},
    }


def test_logprobs_carry_each_tokens_text_offset() -> None:
    asked = completion(
        token_texts=["a", "bc", "d"],
        token_logprobs=[-0.1, -0.2, -0.3],
        top_logprobs=[{"a": -0.1}, {"bc": -0.2}, {"d": -0.3}],
    )
    (choice,) = protocol.completion_response(MODEL, [asked])["choices"]
    assert choice["logprobs"] == {
        "tokens": ["a", "bc", "d"],
        "token_logprobs": [-0.1, -0.2, -0.3],
        "top_logprobs": [{"a": -0.1}, {"bc": -0.2}, {"d": -0.3}],
        "text_offset": [0, 1, 3],
    }


def test_stream_events_share_the_id_and_the_last_one_carries_usage() -> None:
    cid = protocol.completion_id()
    assert cid != protocol.completion_id()
    piece = protocol.stream_chunk(cid, 123, MODEL, 1, "ab")
    assert piece == {
        "id": cid,
        "object": "text_completion",
        "created": 123,
        "model": MODEL,
        "choices": [{"index": 1, "text": "ab", "logprobs": None, "finish_reason": None, "stop_reason": None}],
    }
    assert protocol.stream_chunk(cid, 123, MODEL, 0, "", "stop")["choices"][0]["finish_reason"] == "stop"
    usage = protocol.usage_chunk(cid, 123, MODEL, [completion()])
    assert usage["id"] == cid and usage["choices"] == [] and usage["usage"]["total_tokens"] == 8
