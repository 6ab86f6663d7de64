"""The LMCache engine yaml, read the way LMCache reads it, plus kvbus's own keys.

`load()` is the only constructor. Precedence: `LMCACHE_<KEY>` environment variables
over the file over the defaults. Errors name the key, the bad value and where it came from.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from kvbus.shared.redis_conn import redacted

log = logging.getLogger("kvbus.config")

CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"
ENV_PREFIX = "LMCACHE_"
# The seed's model: the name engines serve and agents key chunks by unless told otherwise.
DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


class ConfigError(ValueError):
    """A config value that cannot be used; the message is meant for the operator as is."""


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ValueError("expected an integer")


def _positive_int(value: Any) -> int:
    number = _int(value)
    if number <= 0:
        raise ValueError("expected an integer > 0")
    return number


def _port(value: Any) -> int:
    number = _int(value)
    if not 0 < number < 65536:
        raise ValueError("expected a port number 1-65535")
    return number


def _non_negative(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError("expected a number") from None
    if number < 0:
        raise ValueError("expected a number >= 0")
    return number


def _positive(value: Any) -> float:
    number = _non_negative(value)
    if number == 0:
        raise ValueError("expected a number > 0")
    return number


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a non-empty string")
    return value.strip()


# The one rule for an instance id kvbus is given to run as (yaml, environment, the agent's and engine's
# --instance-id all come through `_instance_id`): it names a directory under local_disk, so no '/', '.' or
# '..', and it sits in Redis hash tags, so no braces. LMCache's own ids (`lmcache_default_instance`,
# host names, `inst-0:1`) fit. The HTTP API takes any string, as LMCache does: the controller derives
# only hash-tagged Redis keys from a request's id, never a path.
_INSTANCE_ID = re.compile(r"[A-Za-z0-9._:@-]{1,255}")


def valid_instance_id(text: str) -> bool:
    """Whether `text` may name an instance that registers (kvbus agents and LMCache workers alike)."""
    return bool(_INSTANCE_ID.fullmatch(text)) and text not in (".", "..")


def _instance_id(value: Any) -> str:
    text = _text(value)
    if not valid_instance_id(text):
        raise ValueError("expected 1-255 characters of A-Z, a-z, 0-9 and . _ : @ - (not '.' or '..')")
    return text


def _optional_text(value: Any) -> str | None:
    return None if value is None else _text(value)


def _ports(value: Any) -> tuple[int, ...]:
    """LMCache takes one port or a list of them (one per worker id)."""
    if isinstance(value, str):
        text = value.strip()
        value = json.loads(text) if text.startswith("[") else [p for p in text.split(",") if p.strip()]
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ValueError("expected a port or a list of ports")
    return tuple(_port(item) for item in items)


def _optional_ports(value: Any) -> tuple[int, ...] | None:
    return None if value is None else _ports(value)


def _monitor_ports(value: Any) -> dict[str, int] | None:
    """LMCache's `{"pull": P1, "reply": P2, "heartbeat": P3}` (heartbeat optional), as yaml or JSON text."""
    if value is None:
        return None
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, dict) or not {"pull", "reply"} <= value.keys() <= {"pull", "reply", "heartbeat"}:
        raise ValueError('expected {"pull": port, "reply": port} and optionally "heartbeat": port')
    return {name: _port(port) for name, port in value.items() if port is not None}


def _optional_int(value: Any) -> int | None:
    return None if value is None else _int(value)


def _disk_path(value: Any) -> str | None:
    if value is None:
        return None
    text = _text(value)
    return text.removeprefix("file://")


def _redis_url(value: Any) -> str:
    text = _text(value)
    if not text.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("expected a URL starting with redis://, rediss:// or unix://")
    return text


def _spec(parse: Callable[[Any], Any], default: Any, doc: str) -> Any:
    return field(default=default, metadata={"parse": parse, "doc": doc})


@dataclass(frozen=True)
class KVBusConfig:
    # LMCache engine keys (names, meanings and units as in lmcache/v1/config.py).
    chunk_size: int = _spec(_positive_int, 256, "tokens per chunk")
    local_cpu: bool = _spec(_bool, True, "keep chunks in CPU memory (LocalCPUBackend)")
    max_local_cpu_size: float = _spec(_non_negative, 5.0, "GB of CPU memory for chunks")
    local_disk: str | None = _spec(_disk_path, None, "directory for LocalDiskBackend")
    max_local_disk_size: float = _spec(_non_negative, 0.0, "GB of disk for chunks")
    # True (LMCache defaults to false) so that prompts shorter than one chunk, such
    # as the 12-token seed prompt, are cached and can be looked up and cleared.
    save_unfull_chunk: bool = _spec(_bool, True, "also store a trailing partial chunk")
    enable_controller: bool = _spec(_bool, False, "run the kvbus agent in this engine")
    lmcache_instance_id: str = _spec(_instance_id, "lmcache_default_instance", "this instance's id")
    controller_pull_url: str | None = _spec(_optional_text, None, "LMCache worker bridge host:port")
    controller_reply_url: str | None = _spec(_optional_text, None, "LMCache worker reply host:port")
    lmcache_worker_ports: tuple[int, ...] | None = _spec(_optional_ports, None, "worker port per worker id")
    controller_monitor_ports: dict[str, int] | None = _spec(
        _monitor_ports, None, "the controller's ports for LMCache workers: pull, reply and optionally heartbeat"
    )
    p2p_host: str | None = _spec(_optional_text, None, "host other agents reach this one on")
    p2p_init_ports: tuple[int, ...] | None = _spec(_optional_ports, None, "peer port per worker id")
    # kvbus keys. LMCache has no GPU-memory backend key; these two follow its local_cpu pattern.
    local_gpu: bool = _spec(_bool, False, "keep chunks in CUDA memory (LocalGPUBackend), ahead of the CPU")
    max_local_gpu_size: float = _spec(_non_negative, 1.0, "GB of CUDA memory for chunks")
    redis_url: str = _spec(_redis_url, "redis://127.0.0.1:6379/0", "Redis bus and index")
    command_timeout: float = _spec(_positive, 5.0, "seconds the controller waits for an agent")
    heartbeat_interval: float = _spec(
        _positive, 1.0, "seconds between agent heartbeats; heartbeat_ttl / 3, if longer, after one that found no change"
    )
    heartbeat_ttl: float = _spec(_positive, 5.0, "seconds after the last heartbeat an agent counts as dead")
    reap_after: float = _spec(
        _non_negative, 600.0, "seconds without a heartbeat before a controller removes an instance; 0: never"
    )
    event_retention: float = _spec(_positive, 3600.0, "seconds /check_finish remembers a command's outcome")
    max_lookup_tokens: int = _spec(_positive_int, 262_144, "longest token list /lookup accepts")
    lmcache_hash_seed: int | None = _spec(
        _optional_int,
        None,
        "PYTHONHASHSEED of LMCache engines running in vLLM (their chunk keys start from a hash of it); "
        "unset: the controller's own PYTHONHASHSEED if set, else engines without vLLM",
    )
    lmcache_none_hash: int | None = _spec(
        _optional_int,
        None,
        "the hash LMCache engines start their chunk chain from, given outright (0: engines without vLLM, "
        "whatever PYTHONHASHSEED says); unset: derived from lmcache_hash_seed",
    )
    controller_host: str = _spec(_text, "127.0.0.1", "controller bind address (HTTP and LMCache's sockets)")
    controller_port: int = _spec(_port, 9000, "controller HTTP port")
    event_retention_count: int = _spec(
        _positive_int, 100_000, "most command records /check_finish remembers; past it the oldest go first"
    )
    redis_timeout: float = _spec(
        _positive, 1.0, "seconds a controller request waits on Redis (a lookup, a query, a command's send) before a 503"
    )
    # A secret: out of repr, and errors show it as <hidden> (_shown). The controller also reads it from
    # KVBUS_API_TOKEN, so that it need be in no file and on no command line.
    api_token: str | None = field(
        default=None,
        repr=False,
        metadata={
            "parse": _optional_text,
            "doc": "bearer token every controller endpoint but /healthz and the dashboard page requires; unset: none",
        },
    )

    def __post_init__(self) -> None:
        if self.heartbeat_ttl <= self.heartbeat_interval:
            raise ConfigError(
                f"heartbeat_ttl ({self.heartbeat_ttl}) must be longer than "
                f"heartbeat_interval ({self.heartbeat_interval})"
            )

    def with_overrides(self, **values: Any) -> KVBusConfig:
        """Apply values that came from somewhere other than the file (CLI flags, engine args)."""
        unknown = sorted(set(values) - _SPECS.keys())
        if unknown:
            raise ConfigError(
                f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                f"in the command line; known keys: {', '.join(_SPECS)}"
            )
        return replace(self, **{key: _parse(key, value, "the command line") for key, value in values.items()})


_SPECS = {f.name: f for f in fields(KVBusConfig)}

# LMCache keys that are valid in its yaml but mean nothing to kvbus: they get a
# quieter warning than a typo would, so a shared LMCache file loads cleanly.
_LMCACHE_ONLY = frozenset(
    {
        "remote_url",
        "remote_serde",
        "use_layerwise",
        "enable_p2p",
        "p2p_lookup_ports",
        "pre_caching_hash_algorithm",
        "lmcache_worker_ids",
        "lmcache_worker_heartbeat_time",
        "lmcache_worker_heartbeat_delay_time",
        "extra_config",
        "blocking_timeout_secs",
        "cache_policy",
        "enable_blending",
        "numa_mode",
        "internal_api_server_enabled",
    }
)


def _parse(key: str, value: Any, source: str) -> Any:
    try:
        return _SPECS[key].metadata["parse"](value)
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{key}={_shown(key, value)} in {source}: {exc}") from None


def _shown(key: str, value: Any) -> str:
    """A value as an error shows it: never a secret, so never the API token or redis_url's password."""
    if key == "api_token":
        return "<hidden>"
    return redacted(str(value)) if key == "redis_url" else repr(value)


def load(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> KVBusConfig:
    """Read the yaml at `path` (or `$LMCACHE_CONFIG_FILE`), then apply `LMCACHE_<KEY>` overrides."""
    environ = os.environ if environ is None else environ
    path = path if path is not None else environ.get(CONFIG_FILE_ENV)
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_read_file(Path(path)))
    for key in _SPECS:
        env_key = ENV_PREFIX + key.upper()
        if env_key in environ:
            values[key] = _parse(key, environ[env_key], f"environment variable {env_key}")
    try:
        return KVBusConfig(**values)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (in {path or 'defaults'})") from None


def check_devices(config: KVBusConfig) -> None:
    """Refuse a config whose backends need a device this process lacks.

    Only processes that keep chunks call this: a controller reading the same file needs no GPU.
    """
    if not (config.local_gpu and config.max_local_gpu_size > 0):
        return
    # Imported here: the controller reads this module and never needs torch.
    import torch

    if torch.cuda.is_available():
        return
    if torch.version.cuda is None:
        reason = f"this torch ({torch.__version__}) is built without CUDA"
    else:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = "" if visible is None else f" with CUDA_VISIBLE_DEVICES={visible!r}"
        reason = f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device{shown}"
    raise ConfigError(f"local_gpu=True needs a CUDA device, but {reason}; set local_gpu to false")


def _read_file(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        # A YAML error spans several lines (problem, context, a caret under the spot); the reason stays on one.
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"config file {path} is not valid yaml{at}: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SPECS:
            values[key] = _parse(key, value, str(path))
        elif key in _LMCACHE_ONLY:
            log.warning("config key %r in %s is an LMCache setting kvbus does not use; ignored", key, path)
        else:
            log.warning("unknown config key %r in %s; ignored", key, path)
    return values
