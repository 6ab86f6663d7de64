"""The reference engine's OpenAI-compatible server: routes, and a lifespan that owns the model and the agent.

Model work runs on one dedicated thread, so the event loop stays free for health checks and
the model needs no lock; the agent runs its own threads beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import quicktok
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kvbus.agent.agent import Agent
from kvbus.agent.tokenizer import LLAMA3_BOS
from kvbus.engine import protocol
from kvbus.engine.errors import EXCEPTION_HANDLERS, BadRequest, EngineError
from kvbus.engine.generator import Completion, Generator, SamplingParams
from kvbus.engine.model import ModelShape, build_model
from kvbus.shared.config import KVBusConfig

log = logging.getLogger("kvbus.engine")

MAX_BODY_BYTES = 4 * 1024 * 1024


class _BodyTooLarge(EngineError):
    status_code = 413
    kind = "BadRequestError"


TINY = ModelShape()


def create_app(config: KVBusConfig, served_model: str, shape: ModelShape = TINY, seed: int = 0) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvbus-engine-model")
        loop = asyncio.get_running_loop()
        model = await loop.run_in_executor(model_thread, build_model, shape, seed)
        agent = Agent(config, model=served_model)
        stopping = threading.Event()
        try:
            await asyncio.to_thread(agent.start_when_reachable, stopping)
        finally:
            stopping.set()  # a shutdown during the wait ends it
        app.state.generator = Generator(model, agent, quicktok.get_encoding("llama3"))
        app.state.model_thread = model_thread
        app.state.served_model = served_model
        app.state.created = int(time.time())
        log.info(
            "engine serving %s (%.1f M params, %d B of KV per token) as instance %s",
            served_model,
            sum(p.numel() for p in model.parameters()) / 1e6,
            shape.kv_bytes_per_token,
            config.lmcache_instance_id,
        )
        try:
            yield
        finally:
            model_thread.shutdown(wait=True)
            await asyncio.to_thread(agent.stop)
            log.info("engine stopped")

    return Starlette(routes=_ROUTES, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)


async def _body(request: Request) -> bytes:
    """The body, refused with a 413 once it passes MAX_BODY_BYTES: read piece by piece, so that a body
    sent without a Content-Length (chunked) is cut off there rather than read whole into memory."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _BodyTooLarge(f"request body of {declared} bytes exceeds {MAX_BODY_BYTES} bytes")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > MAX_BODY_BYTES:
            raise _BodyTooLarge(f"request body exceeds {MAX_BODY_BYTES} bytes")
    return bytes(body)


def _tokens(generator: Generator, prompt: str | list[int]) -> list[int]:
    return [LLAMA3_BOS, *generator.encoding.encode(prompt)] if isinstance(prompt, str) else prompt


async def completions(request: Request) -> Response:
    generator: Generator = request.app.state.generator
    served: str = request.app.state.served_model
    body = protocol.decode(await _body(request), protocol.CompletionRequest)
    protocol.check_model(body.model, served)
    params = protocol.sampling_params(body)
    prompts = [_tokens(generator, p) for p in protocol.prompts(body.prompt, generator.model.shape.vocab_size)]
    limit = generator.model.shape.max_model_len
    for prompt in prompts:
        if len(prompt) + params.max_tokens > limit:
            raise BadRequest(
                f"This model's maximum context length is {limit} tokens, but the prompt has {len(prompt)} tokens "
                f"and max_tokens asks for {params.max_tokens} more; shorten the prompt or lower max_tokens",
                param="prompt" if len(prompt) >= limit else "max_tokens",
            )
    model_thread: ThreadPoolExecutor = request.app.state.model_thread
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(
            _events(model_thread, generator, served, prompts, params, include_usage), media_type="text/event-stream"
        )
    loop = asyncio.get_running_loop()
    results = [await loop.run_in_executor(model_thread, generator.complete, p, params) for p in prompts]
    return JSONResponse(protocol.completion_response(served, results))


async def _events(
    model_thread: ThreadPoolExecutor,
    generator: Generator,
    served: str,
    prompts: list[list[int]],
    params: SamplingParams,
    include_usage: bool,
) -> AsyncIterator[str]:
    """Server-sent events as vLLM sends them: text pieces, each choice's finish, usage if asked, [DONE]."""
    loop = asyncio.get_running_loop()
    cid, created = protocol.completion_id(), int(time.time())
    results: list[Completion] = []
    for index, prompt in enumerate(prompts):
        pieces: asyncio.Queue[str | None] = asyncio.Queue()

        def run(prompt: list[int] = prompt, pieces: asyncio.Queue[str | None] = pieces) -> Completion:
            try:

                def emit(text: str) -> None:
                    loop.call_soon_threadsafe(pieces.put_nowait, text)

                return generator.complete(prompt, params, emit)
            finally:
                loop.call_soon_threadsafe(pieces.put_nowait, None)

        job = loop.run_in_executor(model_thread, run)
        while (piece := await pieces.get()) is not None:
            yield _sse(protocol.stream_chunk(cid, created, served, index, piece))
        result = await job
        results.append(result)
        yield _sse(protocol.stream_chunk(cid, created, served, index, "", result.finish_reason))
    if include_usage:
        yield _sse(protocol.usage_chunk(cid, created, served, results))
    yield "data: [DONE]\n\n"


def _sse(event: dict[str, Any]) -> str:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"


async def tokenize(request: Request) -> JSONResponse:
    generator: Generator = request.app.state.generator
    body = protocol.decode(await _body(request), protocol.TokenizeRequest)
    protocol.check_model(body.model, request.app.state.served_model)
    ids = list(generator.encoding.encode(body.prompt))
    tokens = [LLAMA3_BOS, *ids] if body.add_special_tokens else ids
    return JSONResponse(
        {
            "count": len(tokens),
            "max_model_len": generator.model.shape.max_model_len,
            "tokens": tokens,
            "token_strs": None,
        }
    )


async def detokenize(request: Request) -> JSONResponse:
    generator: Generator = request.app.state.generator
    body = protocol.decode(await _body(request), protocol.DetokenizeRequest)
    protocol.check_model(body.model, request.app.state.served_model)
    protocol.check_token_ids(body.tokens, generator.model.shape.vocab_size, "tokens")
    return JSONResponse({"prompt": generator.encoding.decode(body.tokens)})


async def models(request: Request) -> JSONResponse:
    served: str = request.app.state.served_model
    card: dict[str, Any] = {
        "id": served,
        "object": "model",
        "created": request.app.state.created,
        "owned_by": "kvbus",
        "root": served,
        "parent": None,
        "max_model_len": request.app.state.generator.model.shape.max_model_len,
    }
    return JSONResponse({"object": "list", "data": [card]})


async def health(request: Request) -> Response:
    return Response(status_code=200)


_ROUTES = [
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/tokenize", tokenize, methods=["POST"]),
    Route("/detokenize", detokenize, methods=["POST"]),
    Route("/v1/models", models, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
]
