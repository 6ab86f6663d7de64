"""docker-compose.yml and the Dockerfile agree with the code: every command parses, every package is copied.

No Docker engine runs here, so the containers are not started; `docker-compose config` validates
the file where the binary exists.
"""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvbus.controller.cli import _parser as controller_parser
from kvbus.engine.cli import _parser as engine_parser

ROOT = Path(__file__).resolve().parents[2]
PARSERS = {"controller": controller_parser, "engine": engine_parser}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def test_kvbus_services_run_commands_our_clis_accept(compose: dict[str, Any]) -> None:
    for name, parser in PARSERS.items():
        service = compose["services"][name]
        command, *argv = service["command"]
        assert command == name
        args = parser(f"kvbus {name}").parse_args(argv)
        assert args.redis_url == "redis://redis:6379/0"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        (published,) = service["ports"]
        assert published == f"127.0.0.1:{args.port}:{args.port}"
    engine_args = engine_parser("kvbus engine").parse_args(compose["services"]["engine"]["command"][1:])
    assert (ROOT / engine_args.config.removeprefix("/app/")).is_file()


def test_redis_keeps_its_data(compose: dict[str, Any]) -> None:
    redis_service = compose["services"]["redis"]
    assert "--appendonly" in redis_service["command"] and "yes" in redis_service["command"]
    assert any(volume.endswith(":/data") for volume in redis_service["volumes"])


def test_the_image_copies_every_installed_package_and_pins_cpu_torch() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for folder in {path.split("/")[0] for path in package_dirs.values()}:
        assert f"COPY {folder} {folder}" in dockerfile, folder
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in dockerfile


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_docker_compose_validates_the_file() -> None:
    result = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
