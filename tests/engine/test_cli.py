"""`kvbus engine`: flags reach the app and the server, and a bad config exits 2 with a one-line reason."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from kvbus.engine import cli
from kvbus.shared.config import DEFAULT_MODEL, KVBusConfig


class Launch:
    """What main() would have started: the app's arguments, the address and uvicorn's options; nothing served."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.app: tuple[KVBusConfig, str, int] | None = None
        self.bound: tuple[str | None, int] | None = None
        self.served: dict[str, Any] | None = None
        monkeypatch.setattr(cli, "create_app", self.create_app)
        monkeypatch.setattr(cli, "listen", self.listen)
        monkeypatch.setattr(cli.uvicorn, "Server", self.server)

    def create_app(self, config: KVBusConfig, model: str, *, seed: int) -> object:
        self.app = (config, model, seed)
        return self

    def listen(self, host: str | None, port: int, what: str = "") -> list[socket.socket]:
        self.bound = (host, port)
        return []

    def server(self, config: uvicorn.Config) -> Any:
        launch = self

        class Server:
            started = True

            def run(self, sockets: list[socket.socket]) -> None:
                assert config.app is launch and sockets == []
                launch.served = {"log_level": config.log_level}

        return Server()


@pytest.fixture
def launch(monkeypatch: pytest.MonkeyPatch) -> Launch:
    # The config also comes from LMCACHE_* variables; the developer's own must not leak into these tests.
    for name in os.environ:
        if name.startswith("LMCACHE_"):
            monkeypatch.delenv(name)
    return Launch(monkeypatch)


def test_flags_reach_the_config_the_app_and_the_server(launch: Launch, tmp_path: Path) -> None:
    config = tmp_path / "engine.yaml"
    config.write_text("chunk_size: 128\nlmcache_instance_id: from-file\nenable_controller: false\n")
    argv = ["--config", str(config), "--redis-url", "redis://cache:6380/1", "--instance-id", "engine-7"]
    argv += ["--host", "0.0.0.0", "--port", "8123", "--model", "tiny", "--seed", "3", "--log-level", "warning"]
    assert cli.main(argv) == 0
    assert launch.app is not None and launch.served is not None
    loaded, model, seed = launch.app
    assert (loaded.chunk_size, loaded.redis_url, loaded.lmcache_instance_id) == (
        128,
        "redis://cache:6380/1",
        "engine-7",
    )
    assert loaded.enable_controller  # the engine always runs its agent, whatever the file says
    assert (model, seed) == ("tiny", 3)
    assert launch.bound == ("0.0.0.0", 8123) and launch.served["log_level"] == "warning"


def test_defaults_serve_the_default_model_on_loopback(launch: Launch) -> None:
    assert cli.main([]) == 0
    assert launch.app is not None and launch.served is not None
    loaded, model, seed = launch.app
    assert (model, seed, loaded.enable_controller) == (DEFAULT_MODEL, 0, True)
    assert launch.bound == ("127.0.0.1", 8000)


def refusal(argv: list[str], capsys: pytest.CaptureFixture[str], launch: Launch) -> str:
    """The reason main() gives for refusing to start, checked to be one line under the program's name."""
    assert cli.main(argv, prog="kvbus-engine") == 2
    err = capsys.readouterr().err
    assert err.startswith("kvbus-engine: ") and err.endswith("\n") and err.count("\n") == 1
    assert launch.app is None and launch.bound is None and launch.served is None
    return err


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["--port", "70000"], "--port 70000 is not a TCP port"),
        (["--port", "0"], "--port 0 is not a TCP port"),
        (["--redis-url", "http://cache:6379"], "redis_url=http://cache:6379 in the command line"),
        (["--instance-id", "a b"], "lmcache_instance_id='a b' in the command line"),
    ],
)
def test_a_bad_flag_exits_2_with_a_one_line_reason(
    launch: Launch, capsys: pytest.CaptureFixture[str], argv: list[str], reason: str
) -> None:
    assert reason in refusal(argv, capsys, launch)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("chunk_size: -1\n", "chunk_size=-1 in "),
        ("- a\n- b\n", "must hold a mapping of keys to values"),
        ("heartbeat_interval: 5\nheartbeat_ttl: 1\n", "heartbeat_ttl (1.0) must be longer"),
    ],
)
def test_a_bad_config_file_exits_2_with_a_one_line_reason(
    launch: Launch, capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, reason: str
) -> None:
    config = tmp_path / "engine.yaml"
    config.write_text(text)
    assert reason in refusal(["--config", str(config)], capsys, launch)


def test_a_missing_config_file_exits_2_naming_it(
    launch: Launch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "missing.yaml"
    assert f"cannot read config file {missing}" in refusal(["--config", str(missing)], capsys, launch)
