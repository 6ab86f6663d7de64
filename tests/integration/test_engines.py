"""Reference engines as users run them: `kvbus up`, the seed's curl flow verbatim, and two engines side by side."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

import kvbus
from tests.conftest import MODEL, SEED_TEXT, SEED_TOKENS, Processes, free_port, wait_for, write_config
from tests.kvbus.port_holder import port_held

INSTANCE = "lmcache_default_instance"
PROMPT_600 = list(range(3000, 3600))


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(url, json=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def cached(engine: str, prompt: Any) -> int:
    body = post(f"{engine}/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0})
    return int(body["usage"]["prompt_tokens_details"]["cached_tokens"])


def lookup(controller: str, tokens: list[int] = SEED_TOKENS) -> dict[str, list[Any]]:
    return post(f"{controller}/lookup", {"tokens": tokens})["layout_info"]  # type: ignore[no-any-return]


@dataclass
class Up:
    proc: subprocess.Popen[bytes]
    out: Path  # what it prints
    engine: str
    controller: str
    redis_port: int
    redis_url: str


@contextlib.contextmanager
def running_up(tmp_path: Path, *, password: str = "", cwd: Path | None = None) -> Iterator[Up]:
    """`kvbus up` (the console script) with the seed's config on free ports and a Redis URL where nothing listens,
    so it must start its own, once it says it is up; stopped at the end, and its Redis with it.

    A URL with a password goes in LMCACHE_REDIS_URL, as up's --help asks; one without, in --redis-url.
    """
    redis_port, engine_port, controller_port = free_port(), free_port(), free_port()
    redis_url = f"redis://{':' + password + '@' if password else ''}127.0.0.1:{redis_port}/0"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"LMCACHE_REDIS_URL": redis_url} if password else {})}
    env.pop("LMCACHE_CONFIG_FILE", None)
    config = Path(__file__).resolve().parents[2] / "configs" / "example.yaml"
    command = [str(Path(sys.executable).parent / "kvbus"), "up", "--config", str(config)]
    command += ["--data-dir", str(tmp_path / "data"), "--engine-port", str(engine_port)]
    command += ["--controller-port", str(controller_port), *([] if password else ["--redis-url", redis_url])]
    log = tmp_path / "up.out"
    out = log.open("wb")
    proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    try:
        wait_for(lambda: "kvbus is up" in log.read_text() or proc.poll() is not None, timeout=90, what="kvbus up")
        assert "kvbus is up" in log.read_text(), log.read_text()
        yield Up(
            proc, log, f"http://localhost:{engine_port}", f"http://localhost:{controller_port}", redis_port, redis_url
        )
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # up stops its parts; a SIGKILL would orphan them
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        out.close()
        if _answers(redis_url):
            redis.Redis.from_url(redis_url).shutdown(nosave=True)


@pytest.fixture
def up(tmp_path: Path) -> Any:
    with running_up(tmp_path) as running:
        yield running.proc, running.engine, running.controller, running.redis_port, tmp_path, running.out


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


@pytest.mark.timeout(240)
def test_seed_curl_flow_verbatim_against_kvbus_up(up: Any) -> None:
    proc, engine, controller, redis_port, tmp_path, log = up
    banner = log.read_text()
    assert f"started redis-server on port {redis_port}" in banner
    assert engine in banner and controller in banner
    assert (tmp_path / "data" / "redis").is_dir()
    config = Path(__file__).resolve().parents[2] / "configs" / "example.yaml"
    for part in ("redis", "controller", "engine"):
        first = (tmp_path / "data" / "logs" / f"{part}.log").read_text().splitlines()[0]
        assert first.startswith("----- ") and f"{part} starts: kvbus {kvbus.__version__}, config {config} -" in first

    completion = post(
        f"{engine}/v1/completions",
        {
            "model": "meta-llama/Llama-3.1-8B-Instruct",
            "prompt": "Explain the significance of KV cache in language models.",
            "max_tokens": 10,
        },
    )
    assert completion["usage"]["prompt_tokens"] == 12 and completion["usage"]["completion_tokens"] == 10
    found = post(f"{controller}/lookup", {"tokens": SEED_TOKENS})
    assert found["layout_info"] == {INSTANCE: ["LocalCPUBackend", 12]} and found["event_id"]
    cleared = post(f"{controller}/clear", {"instance_id": INSTANCE, "location": "LocalCPUBackend"})
    assert cleared["num_tokens"] == 12 and cleared["event_id"]
    assert post(f"{controller}/lookup", {"tokens": SEED_TOKENS})["layout_info"] == {}

    # After the clear the engine recomputes, and the request after that hits again.
    assert cached(engine, SEED_TEXT) == 0
    assert lookup(controller) == {INSTANCE: ["LocalCPUBackend", 12]}
    assert cached(engine, SEED_TEXT) == 11

    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    text = log.read_text()
    assert "stopped engine" in text and "stopped controller" in text and "stopped redis" in text
    assert not _answers(f"redis://127.0.0.1:{redis_port}/0")
    assert any((tmp_path / "data" / "redis").rglob("*.aof*")), "Redis ran without AOF"


@pytest.mark.timeout(240)
def test_600_token_prompt_stores_two_full_and_one_partial_chunk(up: Any) -> None:
    _, engine, controller, *_ = up
    assert cached(engine, PROMPT_600) == 0
    assert lookup(controller, PROMPT_600) == {INSTANCE: ["LocalCPUBackend", 600]}
    assert lookup(controller, PROMPT_600[:512]) == {INSTANCE: ["LocalCPUBackend", 512]}
    assert lookup(controller, PROMPT_600[:300]) == {INSTANCE: ["LocalCPUBackend", 256]}
    assert cached(engine, PROMPT_600) == 599


@pytest.mark.timeout(240)
def test_two_engines_are_two_instances_and_a_clear_of_one_spares_the_other(procs: Processes, redis_url: str) -> None:
    _, controller = procs.controller(redis_url, timeout=10)
    _, first = procs.engine(redis_url, "engine-a")
    second_proc, second = procs.engine(redis_url, "engine-b")
    cached(first, SEED_TEXT)
    cached(second, SEED_TEXT)
    assert lookup(controller) == {"engine-a": ["LocalCPUBackend", 12], "engine-b": ["LocalCPUBackend", 12]}
    cleared = post(f"{controller}/clear", {"instance_id": "engine-a", "location": "LocalCPUBackend"})
    assert cleared["num_tokens"] == 12
    assert lookup(controller) == {"engine-b": ["LocalCPUBackend", 12]}
    assert cached(second, SEED_TEXT) == 11
    assert cached(first, SEED_TEXT) == 0

    second_proc.send_signal(signal.SIGTERM)
    assert second_proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once shut down
    assert lookup(controller) == {"engine-a": ["LocalCPUBackend", 12]}
    assert "agent engine-b worker 0 stopped" in procs.log("engine-engine-b.log")


def test_kvbus_up_without_redis_server_says_how_to_get_one(tmp_path: Path) -> None:
    python_only = tmp_path / "bin"
    python_only.mkdir()
    env = {**os.environ, "PATH": str(python_only)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvbus",
            "up",
            "--redis-url",
            f"redis://127.0.0.1:{free_port()}/0",
            "--data-dir",
            str(tmp_path / "data"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 1
    assert "redis-server is not installed: apt-get install redis-server" in result.stdout


@pytest.mark.timeout(240)
def test_kvbus_up_keeps_the_redis_password_off_command_lines_and_out_of_logs(tmp_path: Path) -> None:
    password = "s3cret-pw"
    with running_up(tmp_path, password=password) as up:
        parts = _children(up.proc.pid)
        assert len(parts) == 3  # redis-server, controller, engine
        for pid in parts:
            command_line = Path(f"/proc/{pid}/cmdline").read_text()
            assert password not in command_line, command_line
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=up.redis_port).ping()  # the Redis up started asks for the URL's password
        assert redis.Redis.from_url(up.redis_url).ping()
    shown = [up.out, *(tmp_path / "data" / "logs").iterdir()]
    assert len(shown) == 4 and all(password not in path.read_text() for path in shown)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):  # a process that ended since the listing
            # "pid (comm) state ppid ...", and comm may hold spaces and parentheses.
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


@pytest.mark.timeout(240)
def test_kvbus_up_runs_from_a_folder_holding_a_kvbus_folder(tmp_path: Path) -> None:
    # The parent of a clone holds kvbus/; a child started with the current directory on sys.path imports it.
    (tmp_path / "kvbus").mkdir()
    (tmp_path / "kvbus" / "__init__.py").write_text("raise ImportError('the kvbus/ in the current directory')\n")
    with running_up(tmp_path, cwd=tmp_path) as up:
        assert "controller ready at" in up.out.read_text() and "engine ready at" in up.out.read_text()


def test_kvbus_up_names_the_holder_of_each_taken_port_and_starts_nothing(tmp_path: Path) -> None:
    with (
        port_held() as (redis_port, redis_holder),
        port_held() as (controller, controller_holder),
        port_held() as (engine, engine_holder),
    ):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "kvbus",
                "up",
                "--redis-url",
                f"redis://127.0.0.1:{redis_port}/0",
                "--controller-port",
                str(controller),
                "--engine-port",
                str(engine),
                "--data-dir",
                str(tmp_path / "data"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1, result.stdout
    out = result.stdout
    assert f"controller port 127.0.0.1:{controller} is already in use by pid {controller_holder} (" in out
    assert f"engine port 127.0.0.1:{engine} is already in use by pid {engine_holder} (" in out
    assert f"Redis port 127.0.0.1:{redis_port} is already in use by pid {redis_holder} (" in out
    # The holders answer 200 to every probe: nothing may be reported ready, or started.
    assert "ready at" not in out and "starting" not in out and "kvbus is up" not in out
    assert not (tmp_path / "data").exists()


def test_kvbus_up_and_engine_refuse_bad_config_in_one_line(tmp_path: Path) -> None:
    bad = write_config(tmp_path / "bad.yaml", chunk_size="big")
    for command in (["up"], ["engine"]):
        result = subprocess.run(
            [sys.executable, "-m", "kvbus", *command, "--config", str(bad)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 2, result
        assert result.stderr.count("\n") == 1 and "chunk_size" in result.stderr


@pytest.mark.timeout(240)
def test_a_killed_kvbus_up_takes_its_parts_with_it(up: Any) -> None:
    proc, engine, controller, redis_port, *_ = up
    proc.kill()
    proc.wait(10)
    wait_for(
        lambda: (
            not _serves(f"{engine}/health")
            and not _serves(f"{controller}/healthz")
            and not _answers(f"redis://127.0.0.1:{redis_port}/0")
        ),
        timeout=60,
        what="the parts of a SIGKILLed kvbus up to stop",
    )


def _serves(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
    except httpx.HTTPError:
        return False
    return True
