"""The vLLM tier: one real vLLM server (with the kvbus connector), one controller and one redis-server of
its own per test module. Skipped, saying why, where .venv-vllm is missing or KVBUS_VLLM=0."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import redis

from tests.conftest import Processes, RedisServer, free_port
from tests.vllm.server import VLLMServer, build_model, unavailable, vllm_server


@dataclass
class Stack:
    vllm: VLLMServer
    controller: str
    redis: redis.Redis
    redis_server: RedisServer  # to stall (SIGSTOP) in a test

    def lookup(self, tokens: list[int]) -> dict[str, object]:
        response = httpx.post(f"{self.controller}/lookup", json={"tokens": tokens}, timeout=10)
        response.raise_for_status()
        return response.json()["layout_info"]  # type: ignore[no-any-return]

    def clear(self) -> int:
        response = httpx.post(
            f"{self.controller}/clear",
            json={"instance_id": "lmcache_default_instance", "location": "LocalCPUBackend"},
            timeout=10,
        )
        response.raise_for_status()
        return response.json()["num_tokens"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"vLLM tier skipped: {reason}")
    workdir = tmp_path_factory.mktemp("vllm")
    server = RedisServer(free_port(), workdir)
    server.start()
    processes = Processes(workdir)
    client = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        _, controller = processes.controller(server.url)
        model = build_model(workdir / "model")
        with vllm_server(model, server.url, free_port(), workdir / "vllm.log") as vllm:
            yield Stack(vllm, controller, client, server)
    finally:
        client.close()
        processes.stop_all()
        server.kill()
