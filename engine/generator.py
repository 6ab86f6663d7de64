"""One completion, end to end: reuse what the agent holds, prefill the rest, store the prompt's KV, decode.

Everything here is synchronous torch work; the server runs it on one dedicated thread, which
also keeps the model single-threaded without a lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import quicktok
import torch

from kvbus.agent.agent import Agent
from kvbus.engine import kv_chunks
from kvbus.engine.model import TinyLlama

log = logging.getLogger("kvbus.engine")

STOP_TOKENS = frozenset({128001, 128008, 128009})  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
# Logits divided by a tinier temperature can overflow to inf, and softmax then gives NaN; vLLM raises a
# temperature in (0, 0.01) to 0.01 for this, and so does this engine.
MIN_TEMPERATURE = 1e-2


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None  # how many alternatives to report per generated token
    stop: tuple[str, ...] = ()


@dataclass
class Completion:
    prompt_tokens: int
    cached_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    token_texts: list[str] = field(default_factory=list)  # filled, like the next two, when logprobs are asked
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)
    finish_reason: str = "length"
    prefill_s: float = 0.0


class Generator:
    def __init__(self, model: TinyLlama, agent: Agent, encoding: quicktok.Encoding) -> None:
        self.model = model
        self.agent = agent
        self.encoding = encoding

    def complete(
        self, prompt: Sequence[int], params: SamplingParams, on_text: Callable[[str], None] | None = None
    ) -> Completion:
        """Generate; `on_text` (for streaming) gets each piece of text as soon as it is final."""
        started = time.perf_counter()
        logits, kvs, cached = self._prefill(prompt)
        result = Completion(prompt_tokens=len(prompt), cached_tokens=cached, prefill_s=time.perf_counter() - started)
        sampler = _Sampler(params)
        pieces: list[bytes] = []
        sent = 0
        # Text that could still turn out to begin a stop string, or half a UTF-8 character, waits.
        held_back = max((len(s) for s in params.stop), default=1) - 1
        for step in range(params.max_tokens):
            token = sampler.pick(logits)
            result.token_ids.append(token)
            if params.logprobs is not None:
                self._record_logprobs(result, logits, token, params.logprobs)
            if token in STOP_TOKENS:
                result.finish_reason = "stop"
                break
            pieces.append(self.encoding.decode_single_token_bytes(token))
            result.text = b"".join(pieces).decode("utf-8", errors="replace")
            hit = _first_stop(result.text, params.stop)
            if hit is not None:
                result.text, result.finish_reason = result.text[:hit], "stop"
                break
            if on_text is not None:
                final = len(result.text) - held_back
                while final > sent and result.text[final - 1] == "\ufffd":
                    final -= 1
                if final > sent:
                    on_text(result.text[sent:final])
                    sent = final
            if step + 1 < params.max_tokens:
                logits, kvs = self.model(torch.tensor([token]), kvs)
        if on_text is not None and len(result.text) > sent:
            on_text(result.text[sent:])
        return result

    def _prefill(self, prompt: Sequence[int]) -> tuple[torch.Tensor, list[kv_chunks.LayerKV], int]:
        """Logits after the prompt, its KV, and how many of its tokens came from the cache."""
        chunks = self.agent.space.chunks(prompt)
        held = self.agent.tiers.retrieve(prompt)
        # At least one token is always computed: the next token's logits come from it.
        cached = min(chunks[len(held) - 1].end, len(prompt) - 1) if held else 0
        past = kv_chunks.glue(held, cached, self.model.shape) if cached else None
        started = time.perf_counter()
        logits, kvs = self.model(torch.tensor(prompt[cached:]), past)
        elapsed = time.perf_counter() - started
        try:
            stored = self.agent.tiers.store(prompt, [*held, *kv_chunks.cut(kvs, chunks[len(held) :])])
        except (RuntimeError, ValueError) as exc:
            log.warning(
                "could not keep the KV of a %d-token prompt (%s); it is served but not cached", len(prompt), exc
            )
            stored = 0
        log.info(
            "prefill %d tokens: %d from cache, %d computed in %.1f ms; %d tokens held",
            len(prompt),
            cached,
            len(prompt) - cached,
            elapsed * 1000,
            stored,
        )
        return logits, kvs, cached

    def _record_logprobs(self, result: Completion, logits: torch.Tensor, token: int, top: int) -> None:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        result.token_texts.append(self.token_text(token))
        result.token_logprobs.append(float(logprobs[token]))
        values, ids = torch.topk(logprobs, max(top, 1))
        alternatives = {self.token_text(int(i)): float(v) for v, i in zip(values[:top], ids[:top], strict=True)}
        alternatives.setdefault(self.token_text(token), float(logprobs[token]))
        result.top_logprobs.append(alternatives)

    def token_text(self, token: int) -> str:
        return self.encoding.decode_single_token_bytes(token).decode("utf-8", errors="replace")


class _Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def pick(self, logits: torch.Tensor) -> int:
        if self.params.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / max(self.params.temperature, MIN_TEMPERATURE), dim=-1)
        if self.params.top_p < 1:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < self.params.top_p
            keep[0] = True  # as in vLLM; the comparison alone keeps nothing for a top_p float32 rounds to 0
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator))


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None
