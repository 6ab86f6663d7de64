"""kvbus as users run it: controller and agent processes, real redis-server, curl-shaped HTTP."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis
import torch

import kvbus
from kvbus.shared import keys
from kvbus.shared.flat_fields import decode
from kvbus.shared.messages import Result
from tests.conftest import SEED_TEXT, SEED_TOKENS, Processes, RedisServer, free_port, wait_for, write_config
from tests.kvbus.port_holder import port_held

INSTANCE = "lmcache_default_instance"
CLEAR_CPU = {"instance_id": INSTANCE, "location": "LocalCPUBackend"}


def lookup(base: str, tokens: list[int] = SEED_TOKENS) -> dict[str, list[object]]:
    response = httpx.post(f"{base}/lookup", json={"tokens": tokens}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["layout_info"]  # type: ignore[no-any-return]


def clear(base: str, body: dict[str, str] = CLEAR_CPU, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{base}/clear", json=body, timeout=timeout)


def stop_while_reading(agent: subprocess.Popen[bytes], client: redis.Redis) -> None:
    """SIGSTOP the agent once it is blocked in XREADGROUP, where Redis still delivers into its pending list.
    A registered agent may not be reading yet: stopped then, it would hold nothing."""
    wait_for(
        lambda: any(c["cmd"] == "xreadgroup" and "b" in c["flags"] for c in client.client_list()),
        what="the agent to block reading its commands",
    )
    os.kill(agent.pid, signal.SIGSTOP)


def results_by_event(client: redis.Redis) -> dict[str, list[Result]]:
    seen: dict[str, list[Result]] = {}
    for key in client.scan_iter(keys.results("*")):
        for _, fields in client.xrange(key):
            if "event_id" in fields:
                result = decode(Result, fields)
                seen.setdefault(result.event_id, []).append(result)
    return seen


def test_the_seed_flow_end_to_end(procs: Processes, redis_url: str) -> None:
    _, base = procs.controller(redis_url)
    procs.agent(redis_url, INSTANCE, "--preload-text", SEED_TEXT)
    wait_for(lambda: lookup(base) != {}, what="preloaded seed prompt in the index")
    assert lookup(base) == {INSTANCE: ["LocalCPUBackend", 12]}
    response = clear(base)
    assert response.status_code == 200
    assert response.json()["num_tokens"] == 12
    assert response.json()["event_id"].startswith("Clear")
    assert lookup(base) == {}  # no wait: the index was updated before the response went out


def test_the_seed_token_body_preloaded_as_token_ids(procs: Processes, redis_url: str) -> None:
    _, base = procs.controller(redis_url)
    procs.agent(redis_url, INSTANCE, "--preload-tokens", ",".join(map(str, SEED_TOKENS)))
    wait_for(lambda: lookup(base) != {}, what="preloaded tokens in the index")
    body = b'{\n"tokens": [128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]\n }'
    response = httpx.post(f"{base}/lookup", content=body, headers={"Content-Type": "application/json"})
    assert response.json()["layout_info"] == {INSTANCE: ["LocalCPUBackend", 12]}


def test_two_controllers_serve_clears_for_one_instance_at_once(procs: Processes, redis_url: str) -> None:
    _, first = procs.controller(redis_url)
    _, second = procs.controller(redis_url)
    procs.agent(redis_url, INSTANCE, "--preload-tokens", ",".join(map(str, SEED_TOKENS)))
    wait_for(lambda: lookup(first) != {}, what="preloaded tokens")
    answers: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda b=base: answers.append(clear(b))) for base in [first, second] * 10]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.status_code for r in answers] == [200] * 20
    assert sorted(r.json()["num_tokens"] for r in answers) == [0] * 19 + [12]
    assert len({r.json()["event_id"] for r in answers}) == 20
    assert lookup(second) == {}


def test_a_killed_agent_answers_its_pending_commands_exactly_once_after_restart(
    procs: Processes,
    redis_url: str,
    real_redis: redis.Redis,
) -> None:
    _, base = procs.controller(redis_url, timeout=20)
    agent = procs.agent(redis_url, INSTANCE)
    stop_while_reading(agent, real_redis)
    answers: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: answers.append(clear(base))) for _ in range(6)]
    for thread in threads:
        thread.start()
    group = keys.command_group(0)
    wait_for(lambda: len(real_redis.xrange(keys.commands(INSTANCE))) >= 6, what="six queued clears")
    delivered = real_redis.xpending(keys.commands(INSTANCE), group)["pending"]
    assert delivered >= 1  # at least one was in the dead agent's hands
    agent.kill()
    agent.wait(10)
    procs.agent(redis_url, INSTANCE)
    for thread in threads:
        thread.join()
    assert [r.status_code for r in answers] == [200] * 6, [r.text for r in answers]
    seen = results_by_event(real_redis)
    assert {r.json()["event_id"] for r in answers} <= set(seen)
    assert all(len(results) == 1 for results in seen.values())
    assert real_redis.xpending(keys.commands(INSTANCE), group)["pending"] == 0


def test_a_clear_to_a_dead_instance_is_504_within_the_timeout(procs: Processes, redis_url: str) -> None:
    _, base = procs.controller(redis_url, timeout=1.5)
    agent = procs.agent(redis_url, INSTANCE)
    agent.kill()
    agent.wait(10)
    started = time.monotonic()
    response = clear(base)
    elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert response.json()["event_id"].startswith("Clear")
    assert "did not answer within 1.5 s" in response.json()["detail"]
    assert 1.5 <= elapsed < 4.0


def test_redis_restarted_under_a_running_controller(procs: Processes, tmp_path: Path) -> None:
    server = RedisServer(free_port(), tmp_path)
    server.start()
    try:
        _, base = procs.controller(server.url)
        procs.agent(server.url, INSTANCE, "--preload-tokens", ",".join(map(str, SEED_TOKENS)))
        wait_for(lambda: lookup(base) != {}, what="preloaded tokens")
        server.kill()
        assert httpx.post(f"{base}/lookup", json={"tokens": SEED_TOKENS}, timeout=10).status_code == 503
        assert clear(base).status_code == 503
        server.start()  # empty: it keeps nothing on disk
        wait_for(
            lambda: lookup(base) == {INSTANCE: ["LocalCPUBackend", 12]},
            timeout=20,
            what="the agent to re-register and re-publish its index",
        )
        wait_for(lambda: clear(base).json().get("num_tokens") == 12, timeout=10, what="clear after recovery")
        assert lookup(base) == {}
    finally:
        server.kill()


def test_sigterm_lets_in_flight_clears_finish(procs: Processes, redis_url: str, real_redis: redis.Redis) -> None:
    controller, base = procs.controller(redis_url, timeout=10)
    agent = procs.agent(redis_url, INSTANCE, "--preload-tokens", ",".join(map(str, SEED_TOKENS)))
    wait_for(lambda: lookup(base) != {}, what="preloaded tokens")
    stop_while_reading(agent, real_redis)
    answers: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: answers.append(clear(base)))
    thread.start()
    wait_for(
        lambda: real_redis.xpending(keys.commands(INSTANCE), keys.command_group(0))["pending"] == 1,
        what="the clear to reach the stopped agent's pending list",
    )
    controller.send_signal(signal.SIGTERM)
    controller_log = f"controller-{base.rsplit(':', 1)[1]}.log"
    wait_for(
        lambda: "Waiting for connections to close" in procs.log(controller_log),
        what="the controller to begin its graceful shutdown",
    )
    assert controller.poll() is None  # still draining the in-flight request
    os.kill(agent.pid, signal.SIGCONT)
    thread.join()
    assert answers[0].status_code == 200 and answers[0].json()["num_tokens"] == 12
    # uvicorn re-raises the signal once shut down, so supervisors see why it exited.
    assert controller.wait(15) in (0, -signal.SIGTERM)
    logs = "".join(procs.log(name) for name in os.listdir(procs.tmp) if name.startswith("controller-"))
    assert "stopped" in logs


def test_an_agent_stopped_by_sigterm_deregisters(procs: Processes, redis_url: str) -> None:
    _, base = procs.controller(redis_url)
    agent = procs.agent(redis_url, INSTANCE, "--preload-tokens", ",".join(map(str, SEED_TOKENS)))
    wait_for(lambda: lookup(base) != {}, what="preloaded tokens")
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(15) == 0
    assert lookup(base) == {}
    response = clear(base)
    assert response.status_code == 404 and response.json()["error"] == "unknown_instance"
    assert "agent lmcache_default_instance worker 0 stopped" in procs.log(f"agent-{INSTANCE}.log")


def test_the_first_line_a_process_logs_names_the_version_and_the_config(procs: Processes, redis_url: str) -> None:
    _, base = procs.controller(redis_url)
    procs.agent(redis_url, INSTANCE)
    first = procs.log(f"controller-{base.rsplit(':', 1)[1]}.log").splitlines()[0]
    assert first.endswith(
        f"controller listening on {base} (kvbus {kvbus.__version__}, config none (built-in defaults))"
    )
    first = procs.log(f"agent-{INSTANCE}.log").splitlines()[0]
    assert first.endswith(f"(kvbus {kvbus.__version__}, config {procs.tmp / (INSTANCE + '.yaml')})"), first
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO kvbus.agent: agent starting as ", first), first


def test_an_agent_exits_as_soon_as_it_says_it_stopped(procs: Processes, redis_url: str) -> None:
    agent = procs.agent(redis_url, INSTANCE, "--preload-text", SEED_TEXT)
    log = f"agent-{INSTANCE}.log"
    wait_for(lambda: "preloaded" in procs.log(log), what="the preload")
    agent.send_signal(signal.SIGTERM)
    wait_for(lambda: f"agent {INSTANCE} worker 0 stopped" in procs.log(log), timeout=10, what="the stopped line")
    said_stopped = time.monotonic()
    assert agent.wait(10) == 0
    # The interpreter's teardown with torch loaded took 0.5 to 2 s here, with nothing left to do.
    assert time.monotonic() - said_stopped < 0.25


def test_the_seed_controller_command_line_works(tmp_path: Path, redis_url: str) -> None:
    port = free_port()
    env = {**os.environ, "LMCACHE_REDIS_URL": redis_url}
    # The console script pip installed beside this interpreter, as the seed runs it.
    script = str(Path(sys.executable).parent / "lmcache_controller")
    proc = subprocess.Popen(
        [script, "--host", "localhost", "--port", str(port), "--monitor-port", "9001"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: httpx.get(f"http://localhost:{port}/healthz").status_code == 200, what="lmcache_controller")
        assert lookup(f"http://localhost:{port}") == {}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) in (0, -signal.SIGTERM)


@pytest.mark.parametrize("command", [["kvbus", "controller"], ["lmcache_controller"], ["kvbus", "engine"]])
def test_a_taken_port_stops_a_server_before_it_says_ready_in_one_line_naming_the_holder(
    redis_url: str, command: list[str]
) -> None:
    script = str(Path(sys.executable).parent / command[0])
    with port_held() as (port, holder):
        proc = subprocess.run(
            [script, *command[1:], "--port", str(port), "--redis-url", redis_url],
            capture_output=True,
            text=True,
            timeout=90,
        )
    # One line and nothing before it: no "listening" or "ready" from a server that never got its port.
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith(
        f"{' '.join(command)}: HTTP port 127.0.0.1:{port} is already in use by pid {holder} ("
    )


def test_a_taken_lmcache_port_stops_the_controller_in_one_line_naming_the_holder(redis_url: str) -> None:
    with port_held() as (reply, holder):
        ports = f'{{"pull": {free_port()}, "reply": {reply}}}'
        proc = subprocess.run(
            [sys.executable, "-m", "kvbus", "controller", "--port", str(free_port()), "--monitor-ports", ports],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "LMCACHE_REDIS_URL": redis_url},
        )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith(
        f"kvbus controller: LMCache reply port 127.0.0.1:{reply} is already in use by pid {holder} ("
    )


@pytest.mark.parametrize("command", [["controller"], ["agent"]])
def test_bad_config_exits_nonzero_with_one_line(tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("chunk_size: lots\n")
    proc = subprocess.run(
        [sys.executable, "-m", "kvbus", *command, "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "chunk_size='lots'" in proc.stderr and str(path) in proc.stderr


def test_an_agent_whose_config_leaves_the_controller_off_says_so(tmp_path: Path) -> None:
    path = write_config(tmp_path / "off.yaml", enable_controller=False)
    proc = subprocess.run(
        [sys.executable, "-m", "kvbus", "agent", "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "enable_controller is false" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("command", [["agent"], ["engine"], ["up", "--data-dir", "unused"]])
def test_local_gpu_without_cuda_exits_nonzero_with_one_line(tmp_path: Path, command: list[str]) -> None:
    path = write_config(tmp_path / "gpu.yaml", local_gpu=True)
    proc = subprocess.run(
        [sys.executable, "-m", "kvbus", *command, "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "local_gpu=True needs a CUDA device" in proc.stderr
    assert not (tmp_path / "unused").exists()  # kvbus up stopped before starting anything


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_chunks_in_gpu_memory_answer_lookup_and_clear(procs: Processes, redis_url: str) -> None:
    _, base = procs.controller(redis_url)
    preload = ("--preload-tokens", ",".join(map(str, SEED_TOKENS)))
    procs.agent(redis_url, INSTANCE, *preload, config={"local_gpu": True, "max_local_gpu_size": 0.01})
    wait_for(lambda: lookup(base) != {}, what="preloaded tokens in the index")
    assert lookup(base) == {INSTANCE: ["LocalGPUBackend", 12]}
    assert clear(base).json()["num_tokens"] == 0  # the CPU tier holds nothing: stores go to the fastest
    response = clear(base, {"instance_id": INSTANCE, "location": "LocalGPUBackend"})
    assert response.status_code == 200 and response.json()["num_tokens"] == 12
    assert lookup(base) == {}


def test_controller_help_says_what_the_monitor_port_is_for() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kvbus", "controller", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    assert "--monitor-port" in proc.stdout and "pull on P, reply on P+1" in " ".join(proc.stdout.split())


def test_a_pending_clear_survives_a_redis_crash_with_aof(procs: Processes, tmp_path: Path) -> None:
    server = RedisServer(free_port(), tmp_path, appendonly=True)
    server.start()
    try:
        with redis.Redis.from_url(server.url) as setup:
            # Every write reaches the AOF before Redis answers, so what XPENDING shows survives a kill -9.
            setup.config_set("appendfsync", "always")
        _, base = procs.controller(server.url, timeout=20)
        agent = procs.agent(server.url, INSTANCE, "--preload-tokens", ",".join(map(str, SEED_TOKENS)))
        wait_for(lambda: lookup(base) != {}, what="preloaded tokens")
        client = redis.Redis.from_url(server.url, decode_responses=True)
        stop_while_reading(agent, client)
        answers: list[httpx.Response] = []
        thread = threading.Thread(target=lambda: answers.append(clear(base)))
        thread.start()
        wait_for(
            lambda: client.xpending(keys.commands(INSTANCE), keys.command_group(0))["pending"] == 1,
            what="the clear to reach the stopped agent's pending list",
        )
        client.close()
        server.kill()  # kill -9: only the AOF remains
        server.start()
        os.kill(agent.pid, signal.SIGCONT)
        thread.join()
        assert answers[0].status_code == 200, answers[0].text
        assert answers[0].json()["num_tokens"] == 12
        assert lookup(base) == {}
    finally:
        server.kill()
