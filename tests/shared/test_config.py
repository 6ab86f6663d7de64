from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from kvbus.shared.config import ConfigError, KVBusConfig, load

EXAMPLE = Path(__file__).parents[2] / "configs" / "example.yaml"


def test_the_seed_example_loads_with_lmcache_meanings() -> None:
    config = load(EXAMPLE, environ={})
    assert config.chunk_size == 256
    assert config.local_cpu is True
    assert config.max_local_cpu_size == 5.0
    assert config.enable_controller is True
    assert config.lmcache_instance_id == "lmcache_default_instance"
    assert config.controller_pull_url == "localhost:9001"
    assert config.lmcache_worker_ports == (8001,)
    assert config.p2p_host == "localhost"
    assert config.p2p_init_ports == (8200,)
    assert config.save_unfull_chunk is True
    assert config.redis_url == "redis://127.0.0.1:6379/0"


def test_defaults_are_safe() -> None:
    config = load(None, environ={})
    assert config == KVBusConfig()
    assert config.controller_host == "127.0.0.1"
    assert config.local_disk is None and config.max_local_disk_size == 0.0
    assert config.local_gpu is False and config.max_local_gpu_size == 1.0


def test_the_gpu_tier_keys_load_like_the_cpu_ones(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("local_gpu: True\nmax_local_gpu_size: 0.5\n")
    config = load(path, environ={})
    assert config.local_gpu is True and config.max_local_gpu_size == 0.5
    assert load(None, environ={"LMCACHE_LOCAL_GPU": "true"}).local_gpu is True


def test_the_file_comes_from_lmcache_config_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("chunk_size: 16\n")
    assert load(environ={"LMCACHE_CONFIG_FILE": str(path)}).chunk_size == 16


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("chunk_size: 16\nlocal_cpu: true\nredis_url: redis://a:1/0\n")
    config = load(
        path,
        environ={
            "LMCACHE_CHUNK_SIZE": "64",
            "LMCACHE_LOCAL_CPU": "False",
            "LMCACHE_REDIS_URL": "redis://b:2/1",
            "LMCACHE_P2P_INIT_PORTS": "[8200, 8201]",
            "LMCACHE_LMCACHE_WORKER_PORTS": "8001,8002",
        },
    )
    assert config.chunk_size == 64
    assert config.local_cpu is False
    assert config.redis_url == "redis://b:2/1"
    assert config.p2p_init_ports == (8200, 8201)
    assert config.lmcache_worker_ports == (8001, 8002)


def test_other_lmcache_keys_load(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("local_disk: file:///tmp/kv\nmax_local_disk_size: 2.5\nsave_unfull_chunk: false\n")
    config = load(path, environ={})
    assert config.local_disk == "/tmp/kv"
    assert config.max_local_disk_size == 2.5
    assert config.save_unfull_chunk is False


def test_unknown_key_is_named_in_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("chunk_sise: 16\nremote_url: lm://x\n")
    with caplog.at_level(logging.WARNING, logger="kvbus.config"):
        config = load(path, environ={})
    assert config.chunk_size == 256
    assert f"unknown config key 'chunk_sise' in {path}; ignored" in caplog.messages
    assert f"config key 'remote_url' in {path} is an LMCache setting kvbus does not use; ignored" in caplog.messages


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("chunk_size: big\n", "chunk_size"),
        ("chunk_size: 0\n", "chunk_size"),
        ("local_cpu: maybe\n", "local_cpu"),
        ("max_local_cpu_size: -1\n", "max_local_cpu_size"),
        ("local_gpu: maybe\n", "local_gpu"),
        ("max_local_gpu_size: -1\n", "max_local_gpu_size"),
        ("lmcache_worker_ports: [80, 70000]\n", "lmcache_worker_ports"),
        ("redis_url: localhost:6379\n", "redis_url"),
        ("lmcache_instance_id: ''\n", "lmcache_instance_id"),
        ("lmcache_instance_id: 'a{b}'\n", "lmcache_instance_id"),
        ("lmcache_instance_id: '../x'\n", "lmcache_instance_id"),
        ("lmcache_instance_id: '..'\n", "lmcache_instance_id"),
        ("command_timeout: 0\n", "command_timeout"),
    ],
)
def test_a_bad_value_names_key_and_file(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load(path, environ={})
    assert key in str(caught.value)
    assert str(path) in str(caught.value)


def test_a_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="LMCACHE_CHUNK_SIZE"):
        load(None, environ={"LMCACHE_CHUNK_SIZE": "many"})


def test_heartbeat_ttl_must_outlast_the_interval(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("heartbeat_interval: 5\nheartbeat_ttl: 2\n")
    with pytest.raises(ConfigError, match="heartbeat_ttl"):
        load(path, environ={})


@pytest.mark.parametrize("text", ["- a\n- b\n", "chunk_size: [\n"])
def test_a_file_that_is_not_a_mapping_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=str(path)):
        load(path, environ={})


def test_a_missing_file_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(tmp_path / "nope.yaml", environ={})


def test_command_line_overrides_are_validated() -> None:
    config = load(None, environ={}).with_overrides(controller_port=9100)
    assert config.controller_port == 9100
    with pytest.raises(ConfigError, match="controller_port"):
        config.with_overrides(controller_port=0)


def test_an_unknown_override_is_a_config_error_naming_it_and_the_known_keys() -> None:
    config = load(None, environ={})
    with pytest.raises(ConfigError) as caught:
        config.with_overrides(chunk_size=16, chunk_sise=16, redis_ulr="redis://x")
    message = str(caught.value)
    assert message.startswith("unknown config keys 'chunk_sise', 'redis_ulr' in the command line; known keys: ")
    assert "chunk_size, local_cpu," in message and "controller_port" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match="unknown config key 'nope' "):
        config.with_overrides(nope=1)


def test_invalid_yaml_is_refused_on_one_line_naming_where(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("chunk_size: [1,\nfoo: : bar\n")
    with pytest.raises(ConfigError) as raised:
        load(path)
    assert "\n" not in str(raised.value)
    assert str(path) in str(raised.value) and "line 2" in str(raised.value)


@pytest.mark.parametrize("instance_id", ["lmcache_default_instance", "inst-0:1", "engine@node-7.example.com", "..."])
def test_instance_ids_of_the_usual_shapes_load(instance_id: str) -> None:
    assert load(None, environ={"LMCACHE_LMCACHE_INSTANCE_ID": instance_id}).lmcache_instance_id == instance_id


@pytest.mark.parametrize("instance_id", ["../x", "a/b", ".", "..", "a b", "a{b", "x" * 256, "caf\u00e9"])
def test_one_rule_refuses_an_instance_id_from_the_file_the_environment_or_the_command_line(
    tmp_path: Path, instance_id: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"lmcache_instance_id": instance_id}))
    refusals = []
    for attempt in (
        lambda: load(path, environ={}),
        lambda: load(None, environ={"LMCACHE_LMCACHE_INSTANCE_ID": instance_id}),
        lambda: load(None, environ={}).with_overrides(lmcache_instance_id=instance_id),
    ):
        with pytest.raises(ConfigError) as caught:
            attempt()
        refusals.append(str(caught.value))
    assert all("lmcache_instance_id" in r and "\n" not in r for r in refusals), refusals
