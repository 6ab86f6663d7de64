"""OpenAI's completions shapes (and vLLM's /tokenize), parsed into checked values and built back into JSON.

Fields this engine does not implement are ignored, as vLLM ignores unknown ones; fields it
does read are checked, and a bad one is a 400 naming it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, TypeVar

import msgspec

from kvbus.engine.errors import BadRequest, ModelNotFound
from kvbus.engine.generator import Completion, SamplingParams
from kvbus.shared import json_depth

MAX_LOGPROBS = 20
# The deepest body this engine reads is 3 levels ({"prompt": [[ids]]}); 64 leaves room for the unknown
# fields clients send and it ignores, far below the ~1000 levels at which msgspec's parser recurses
# out of Python's stack (a RecursionError, so a 500).
MAX_DEPTH = 64
# vLLM takes a seed in the signed 64-bit range (its CompletionRequest: `ge=_INT64_MIN, le=_INT64_MAX`), and so
# does this engine; torch.Generator.manual_seed would also take up to 2**64 - 1, but raises past either end.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
_T = TypeVar("_T")


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class CompletionRequest(msgspec.Struct):
    prompt: Any
    model: str | None = None
    max_tokens: int | None = 16
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    n: int = 1
    stream: bool = False
    logprobs: int | None = None
    echo: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    stream_options: StreamOptions | None = None


class TokenizeRequest(msgspec.Struct):
    prompt: str
    model: str | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(msgspec.Struct):
    tokens: list[int]
    model: str | None = None


def decode(body: bytes, kind: type[_T]) -> _T:
    _check_depth(body)
    try:
        # Straight into `kind`, so that a number out of range names its field too (`$.temperature`,
        # where a plain decode says `$[...]`).
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise _refusal(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None


def _refusal(message: str) -> BadRequest:
    """A 400 naming the field msgspec's message points at."""
    if "at `$." in message:
        return BadRequest(message, param=message.rpartition("at `$.")[2].rstrip("`").split("[")[0].split(".")[0])
    if "missing required field" in message:
        return BadRequest(message, param=message.split("`")[1])
    return BadRequest("request body must be a JSON object")  # the only refusal of the body as a whole


def _check_depth(body: bytes) -> None:
    """Refuse a body nested deeper than MAX_DEPTH, before any parser recurses into it."""
    depth = json_depth.deeper_than(body, MAX_DEPTH)
    if depth is not None:
        raise BadRequest(f"request body is nested {depth} levels deep; at most {MAX_DEPTH} are accepted")


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise ModelNotFound(f"The model `{requested}` does not exist; this engine serves `{served}`.", param="model")


def sampling_params(request: CompletionRequest) -> SamplingParams:
    if request.n != 1:
        raise BadRequest("n must be 1: the reference engine returns one choice per prompt", param="n")
    if request.stream and request.logprobs is not None:
        raise BadRequest(
            "logprobs are not streamed by the reference engine; send stream: false to get them", param="logprobs"
        )
    if request.echo:
        raise BadRequest("echo is not supported by the reference engine", param="echo")
    max_tokens = 16 if request.max_tokens is None else request.max_tokens
    if max_tokens < 1:
        raise BadRequest(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    temperature = 1.0 if request.temperature is None else request.temperature
    if not 0 <= temperature <= 2:
        raise BadRequest(f"temperature must be in [0, 2], got {temperature}", param="temperature")
    top_p = 1.0 if request.top_p is None else request.top_p
    if not 0 < top_p <= 1:
        raise BadRequest(f"top_p must be in (0, 1], got {top_p}", param="top_p")
    if request.logprobs is not None and not 0 <= request.logprobs <= MAX_LOGPROBS:
        raise BadRequest(f"logprobs must be in [0, {MAX_LOGPROBS}], got {request.logprobs}", param="logprobs")
    if request.seed is not None and not SEED_MIN <= request.seed <= SEED_MAX:
        raise BadRequest(
            f"seed must be a signed 64-bit integer, from {SEED_MIN} to {SEED_MAX}, got {request.seed}", param="seed"
        )
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=request.seed,
        logprobs=request.logprobs,
        stop=tuple(s for s in stop if s),
    )


def prompts(raw: Any, vocab_size: int) -> list[str | list[int]]:
    """The request's prompts: a string, token ids, or a list of either (a batch)."""
    if isinstance(raw, str) or _is_token_list(raw):
        batch = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(p, str) or _is_token_list(p) for p in raw):
        batch = raw
    else:
        raise BadRequest("prompt must be a string, a list of token ids, or a list of those", param="prompt")
    for prompt in batch:
        if len(prompt) == 0:
            raise BadRequest("prompt must not be empty", param="prompt")
        if not isinstance(prompt, str):
            check_token_ids(prompt, vocab_size, "prompt")
    return batch


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    """Every id must name a row of the model's embedding (and a token the tokenizer can decode)."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise BadRequest(
            f"token id {bad} is outside the vocabulary: ids run from 0 to {vocab_size - 1} "
            f"(vocabulary size {vocab_size})",
            param=param,
        )


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def completion_response(model: str, completions: list[Completion]) -> dict[str, Any]:
    return {
        "id": completion_id(),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "text": c.text,
                "logprobs": _logprobs(c) if c.token_logprobs else None,
                "finish_reason": c.finish_reason,
                "stop_reason": None,
            }
            for i, c in enumerate(completions)
        ],
        "usage": usage(completions),
    }


def stream_chunk(
    cid: str, created: int, model: str, index: int, text: str, finish_reason: str | None = None
) -> dict[str, Any]:
    """One server-sent event of a streamed completion: a piece of one choice's text."""
    return {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason, "stop_reason": None}
        ],
    }


def usage_chunk(cid: str, created: int, model: str, completions: list[Completion]) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(completions),
    }


def usage(completions: list[Completion]) -> dict[str, Any]:
    prompt_tokens = sum(c.prompt_tokens for c in completions)
    generated = sum(len(c.token_ids) for c in completions)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": generated,
        "total_tokens": prompt_tokens + generated,
        "prompt_tokens_details": {"cached_tokens": sum(c.cached_tokens for c in completions)},
    }


def _logprobs(completion: Completion) -> dict[str, Any]:
    offsets, position = [], 0
    for token in completion.token_texts:
        offsets.append(position)
        position += len(token)
    return {
        "tokens": completion.token_texts,
        "token_logprobs": completion.token_logprobs,
        "top_logprobs": completion.top_logprobs,
        "text_offset": offsets,
    }
