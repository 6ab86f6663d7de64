"""`kvbus up`: flags over the config file (a flag given wins, one left out leaves the file's value), and readiness."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import kvbus
from kvbus import up
from kvbus.up import Stack, StartFailed, _parser, _Part, main, resolve
from tests.kvbus.port_holder import port_held


def config_of(*argv: str) -> tuple[str, int, str]:
    config = resolve(_parser("kvbus up").parse_args(list(argv)))
    return config.controller_host, config.controller_port, config.redis_url


@pytest.fixture(autouse=True)
def no_config_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LMCACHE_CONFIG_FILE", "LMCACHE_CONTROLLER_HOST", "LMCACHE_CONTROLLER_PORT", "LMCACHE_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text("controller_host: 0.0.0.0\ncontroller_port: 9100\nredis_url: redis://127.0.0.1:6390/0\n")
    return path


def test_without_flags_the_config_file_decides(config_file: Path) -> None:
    assert config_of("--config", str(config_file)) == ("0.0.0.0", 9100, "redis://127.0.0.1:6390/0")


def test_without_flags_or_file_the_built_in_defaults_decide() -> None:
    assert config_of() == ("127.0.0.1", 9000, "redis://127.0.0.1:6379/0")


def test_flags_given_override_the_config_file(config_file: Path) -> None:
    argv = ["--config", str(config_file), "--host", "127.0.0.2", "--controller-port", "9200"]
    assert config_of(*argv, "--redis-url", "redis://127.0.0.1:6391/0") == (
        "127.0.0.2",
        9200,
        "redis://127.0.0.1:6391/0",
    )
    assert config_of("--config", str(config_file), "--controller-port", "9200")[:2] == ("0.0.0.0", 9200)


def test_help_states_every_options_default(capsys: pytest.CaptureFixture[str]) -> None:
    parser = _parser("kvbus up")
    options = [action for action in parser._actions if action.dest != "help"]
    assert options and all("(default: " in (action.help or "") for action in options)
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: controller_host from the config, 127.0.0.1" in text
    assert (
        "--controller-port CONTROLLER_PORT controller HTTP port (default: controller_port from the config, 9000)"
        in text
    )
    assert "--engine-port ENGINE_PORT reference engine HTTP port (default: 8000)" in text


def test_a_bad_port_flag_stops_before_starting_anything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--controller-port", "70000", "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "controller_port=70000" in err
    assert not (tmp_path / "data").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a port's owner is found through /proc")
def test_a_part_is_not_ready_while_its_port_answers_from_another_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(up, "_START_TIMEOUT_S", 1.0)
    args = _parser("kvbus up").parse_args(["--data-dir", str(tmp_path)])
    said: list[str] = []
    stack = Stack(resolve(args), args, said.append)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    stack.parts.append(_Part("controller", child, tmp_path / "controller.log"))
    try:
        with port_held() as (port, _), pytest.raises(StartFailed, match="controller was not ready after 1 s"):
            stack._wait_http("controller", "127.0.0.1", port, "/healthz")  # the holder answers it with a 200
    finally:
        child.kill()
        child.wait(10)
    assert said == []


def test_each_run_starts_each_log_with_the_version_the_config_and_the_time(tmp_path: Path, config_file: Path) -> None:
    args = _parser("kvbus up").parse_args(["--config", str(config_file), "--data-dir", str(tmp_path)])
    stack = Stack(resolve(args), args, lambda line: None)
    (tmp_path / "logs").mkdir()
    for run in ("first", "second"):
        stack._spawn("echo", ["/bin/echo", f"{run} run"], python=False)
        assert stack.parts[-1].process.wait(10) == 0
    lines = (tmp_path / "logs" / "echo.log").read_text().splitlines()
    header = rf"----- \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d echo starts: kvbus {kvbus.__version__}, config "
    header += re.escape(str(config_file)) + " -----"
    assert len(lines) == 4 and re.fullmatch(header, lines[0]) and re.fullmatch(header, lines[2]), lines
    assert lines[1::2] == ["first run", "second run"]
