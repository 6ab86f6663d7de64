"""`kvbus up`: the whole seed set-up in one command: Redis, the controller and a reference engine.

Every port it needs is checked before anything starts, and a taken one is reported with the
process that holds it. Redis is started only when none answers at the configured URL; it then
runs with AOF under the data directory, so the index survives a restart. Each part logs to its
own file there, and Ctrl-C or SIGTERM stops what this command started, engine first.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit

import redis

from kvbus.logs import run_facts
from kvbus.ports import PortError, check_free, listened_by
from kvbus.shared.config import DEFAULT_MODEL, ENV_PREFIX, ConfigError, KVBusConfig, check_devices, load
from kvbus.shared.redis_conn import redacted, seed_urls

_START_TIMEOUT_S = 120.0
_PR_SET_PDEATHSIG = 1
_STOP_TIMEOUT_S = 20.0
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
_REDIS_BIND = "127.0.0.1"
_SEED_TOKENS = "[128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]"


class StartFailed(Exception):
    pass


@dataclass
class _Part:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path


class Stack:
    def __init__(self, config: KVBusConfig, args: argparse.Namespace, say: Callable[[str], None]) -> None:
        self.config = config
        self.args = args
        self.say = say
        self.data = Path(args.data_dir).resolve()
        self.parts: list[_Part] = []
        self.stopping = threading.Event()

    def start(self) -> None:
        redis_server = self._redis_server()
        # Every port is checked before anything starts: a readiness probe would otherwise reach
        # whoever holds one and report a part ready that is about to die on its port.
        self._check_ports(redis_server is not None)
        (self.data / "logs").mkdir(parents=True, exist_ok=True)
        self.say(f"[1/3] Redis at {redacted(self.config.redis_url)}")
        if redis_server is None:
            self.say("      already running; using it")
        else:
            self._start_redis(redis_server)
        host = self.config.controller_host
        self.say("[2/3] controller")
        self._spawn(
            "controller",
            [
                "controller",
                "--host",
                host,
                "--port",
                str(self.config.controller_port),
                *self._config_flag(),
            ],
        )
        self._wait_http("controller", host, self.config.controller_port, "/healthz")
        self.say("[3/3] reference engine")
        self._spawn(
            "engine",
            [
                "engine",
                "--host",
                host,
                "--port",
                str(self.args.engine_port),
                "--model",
                self.args.model,
                "--instance-id",
                self.config.lmcache_instance_id,
                *self._config_flag(),
            ],
        )
        self._wait_http("engine", host, self.args.engine_port, "/health")

    def _config_flag(self) -> list[str]:
        return ["--config", str(Path(self.args.config).resolve())] if self.args.config else []

    def _redis_server(self) -> str | None:
        """The redis-server to start, or None when a Redis already answers at the URL."""
        url = self.config.redis_url
        if _pings(url):
            return None
        if len(seed_urls(url)) > 1:
            raise StartFailed(
                f"no node of the Redis Cluster at {redacted(url)} answers, and kvbus up starts a single Redis, "
                "never a cluster; start the cluster, or point redis_url (or --redis-url) at one Redis"
            )
        if urlsplit(url).hostname not in _LOCAL_HOSTS:
            raise StartFailed(
                f"no Redis answers at {redacted(url)}, and kvbus up starts one only on this "
                "machine; start that server or point redis_url (or --redis-url) at one"
            )
        binary = shutil.which("redis-server")
        if binary is None:
            raise StartFailed(
                "no Redis answers and redis-server is not installed: apt-get install redis-server "
                "(Debian/Ubuntu), brew install redis (macOS), or docker run -p 6379:6379 redis:7"
            )
        return binary

    def _check_ports(self, starting_redis: bool) -> None:
        """Refuse, naming each holder, when a port a part needs is taken; warn for the optional peer port."""
        host = self.config.controller_host
        needed = [
            ("controller port", host, self.config.controller_port, "--controller-port"),
            ("engine port", host, self.args.engine_port, "--engine-port"),
        ]
        needed += [
            (f"controller's LMCache {name} port", host, port, "controller_monitor_ports in the config")
            for name, port in (self.config.controller_monitor_ports or {}).items()
        ]
        if starting_redis:
            needed.append(("Redis port", _REDIS_BIND, self._redis_port(), "--redis-url, or start that Redis"))
        problems = []
        seen: dict[int, str] = {}
        for what, bind_host, port, change in needed:
            if port in seen:
                problems.append(f"the {seen[port]} and the {what} are both {port}; change {change}")
                continue
            seen[port] = what
            try:
                check_free(bind_host, port, what)
            except PortError as exc:
                problems.append(f"{exc}; stop it or change {change}")
        if problems:
            raise StartFailed("nothing started:\n  " + "\n  ".join(problems))
        peer = _address_of_peers(self.config)
        if peer is not None:
            try:
                check_free(*peer, "engine's peer port")
            except PortError as exc:
                # As the engine itself treats it: everything but /move into this engine still works.
                self.say(f"      warning: {exc}; /move into this engine will fail (p2p_init_ports in the config)")

    def _redis_port(self) -> int:
        return urlsplit(self.config.redis_url).port or 6379

    def _start_redis(self, binary: str) -> None:
        store = self.data / "redis"
        store.mkdir(parents=True, exist_ok=True)
        port = self._redis_port()
        self._spawn(
            "redis",
            [
                binary,
                "--port",
                str(port),
                "--bind",
                _REDIS_BIND,
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                "--dir",
                str(store),
                "-",  # the rest of the config, the password included, comes on stdin
            ],
            python=False,
            stdin=_redis_secrets(self.config.redis_url),
        )
        url = self.config.redis_url
        self._wait("redis", lambda pid: _pings(url) and listened_by(pid, port) is not False)
        self.say(f"      started redis-server on port {port}, AOF under {store}")

    def _spawn(self, name: str, argv: list[str], *, python: bool = True, stdin: bytes | None = None) -> None:
        """Start a part; secrets reach it through its environment or `stdin`, never argv, which `ps` shows to all."""
        log_path = self.data / "logs" / f"{name}.log"
        self.say(f"      starting {name} (log {log_path})")
        # -P: the current directory stays off sys.path, so a kvbus/ folder there (the parent of a
        # clone) cannot shadow the installed package.
        command = [sys.executable, "-P", "-m", "kvbus", *argv] if python else argv
        # The Redis URL may carry a password; config.load() reads LMCACHE_REDIS_URL over the file.
        env = {**os.environ, f"{ENV_PREFIX}REDIS_URL": self.config.redis_url} if python else None
        with log_path.open("ab") as log_file:
            # Logs are appended run after run: this line marks where each run starts.
            started = datetime.now().astimezone().isoformat(timespec="seconds")
            header = f"----- {started} {name} starts: {run_facts(self.args.config)} -----\n"
            log_file.write(header.encode())
            log_file.flush()  # before the part's own output, which goes to the same file
            process = subprocess.Popen(
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.parts.append(_Part(name, process, log_path))
        if process.stdin is not None:
            # A part that died before reading is reported by the wait for it to be ready.
            with contextlib.suppress(BrokenPipeError), process.stdin:
                process.stdin.write(stdin or b"")

    def _wait_http(self, name: str, host: str, port: int, path: str) -> None:
        url = f"http://{host}:{port}"
        # A 200 counts only when the socket behind the port is this part's own.
        self._wait(name, lambda pid: _http_ok(url + path) and listened_by(pid, port) is not False)
        self.say(f"      {name} ready at {url}")

    def _wait(self, name: str, ready: Callable[[int], bool]) -> None:
        part = next(p for p in self.parts if p.name == name)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not ready(part.process.pid):
            if part.process.poll() is not None:
                raise StartFailed(
                    f"{name} exited with code {part.process.returncode} while starting:\n{_tail(part.log_path)}"
                )
            if self.stopping.is_set():
                raise StartFailed("interrupted while starting")
            if time.monotonic() > deadline:
                raise StartFailed(f"{name} was not ready after {_START_TIMEOUT_S:.0f} s; see {part.log_path}")
            self.stopping.wait(0.2)

    def watch(self) -> str | None:
        """Block until asked to stop, or until a part dies: then its name."""
        while not self.stopping.wait(0.5):
            for part in self.parts:
                if part.process.poll() is not None:
                    return part.name
        return None

    def stop(self) -> None:
        for part in reversed(self.parts):
            if part.process.poll() is None:
                part.process.send_signal(signal.SIGTERM)
                try:
                    part.process.wait(timeout=_STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.say(f"{part.name} did not stop within {_STOP_TIMEOUT_S:.0f} s; killing it")
                    part.process.kill()
                    part.process.wait()
            self.say(f"stopped {part.name}")


def _redis_secrets(url: str) -> bytes:
    """redis-server config lines that make it ask for the URL's credentials (none without a password)."""
    where = urlsplit(url)
    if where.password is None:
        return b""
    password = unquote(where.password)
    lines = [f"requirepass {_quoted(password)}"]
    user = unquote(where.username or "default")
    if user != "default":
        lines.append(f"user {_quoted(user)} on {_quoted('>' + password)} ~* &* +@all")
    return "".join(line + "\n" for line in lines).encode()


def _quoted(text: str) -> str:
    """`text` as a redis.conf double-quoted string, every byte \\x-escaped so no character of it can end the string."""
    return '"' + "".join(f"\\x{byte:02x}" for byte in text.encode()) + '"'


def _die_with_parent() -> None:
    """In the child: on Linux, get SIGTERM when `kvbus up` dies, even by SIGKILL, so no part is orphaned."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _address_of_peers(config: KVBusConfig) -> tuple[str, int] | None:
    """Where the engine's agent (worker 0) listens for /move transfers, if p2p_init_ports gives it a port."""
    if not config.p2p_init_ports:
        return None
    return config.p2p_host or "127.0.0.1", config.p2p_init_ports[0]


def _pings(url: str) -> bool:
    """Whether a Redis answers at `url`; for a list of cluster seeds (host1:port1,host2:port2), any one of them."""
    for node in seed_urls(url):
        try:
            with redis.Redis.from_url(node, socket_timeout=1, socket_connect_timeout=1) as client:
                if client.ping():
                    return True
        except redis.RedisError:
            continue
    return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _banner(config: KVBusConfig, args: argparse.Namespace) -> str:
    engine = f"http://localhost:{args.engine_port}"
    controller = f"http://localhost:{config.controller_port}"
    instance = config.lmcache_instance_id
    return f"""
kvbus is up:
  engine      {engine}  (OpenAI API, model {args.model}, instance {instance})
  controller  {controller}  (/lookup, /clear, /healthz)
  redis       {redacted(config.redis_url)}
  logs        {Path(args.data_dir).resolve() / "logs"}

Try the seed flow:
  curl -X POST {engine}/v1/completions -H "Content-Type: application/json" \\
    -d '{{"model": "{args.model}", "prompt": "Explain the significance of KV cache in language models.", \
"max_tokens": 10}}'
  curl -X POST {controller}/lookup -H "Content-Type: application/json" -d '{{"tokens": {_SEED_TOKENS}}}'
  curl -X POST {controller}/clear -H "Content-Type: application/json" \\
    -d '{{"instance_id": "{instance}", "location": "LocalCPUBackend"}}'

Ctrl-C stops everything.
"""


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="LMCache/kvbus yaml (default: $LMCACHE_CONFIG_FILE, else built-in defaults)")
    # Defaults are None so that only flags actually given override the config file.
    parser.add_argument(
        "--host", help="address the controller and engine bind (default: controller_host from the config, 127.0.0.1)"
    )
    parser.add_argument(
        "--controller-port", type=int, help="controller HTTP port (default: controller_port from the config, 9000)"
    )
    parser.add_argument("--engine-port", type=int, default=8000, help="reference engine HTTP port (default: 8000)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"engine's served model name (default: {DEFAULT_MODEL})")
    parser.add_argument(
        "--redis-url",
        help=(
            "Redis bus and index (default: $LMCACHE_REDIS_URL, else redis_url from the config, else "
            "redis://127.0.0.1:6379/0); a URL with a password belongs in $LMCACHE_REDIS_URL or the config file, "
            "since every user can read a command line"
        ),
    )
    parser.add_argument("--data-dir", default="data", help="Redis AOF and logs go here (default: ./data)")
    return parser


def resolve(args: argparse.Namespace) -> KVBusConfig:
    """The config file (or $LMCACHE_CONFIG_FILE), with the flags that were given on top."""
    flags = {"redis_url": args.redis_url, "controller_host": args.host, "controller_port": args.controller_port}
    return load(args.config).with_overrides(**{key: value for key, value in flags.items() if value is not None})


def main(argv: list[str] | None = None, prog: str = "kvbus up") -> int:
    args = _parser(prog).parse_args(argv)
    try:
        config = resolve(args)
        # Before Redis and the controller start: the engine would only die with this later.
        check_devices(config)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2

    def say(line: str) -> None:
        print(line, flush=True)

    stack = Stack(config, args, say)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stack.stopping.set())
    code = 0
    try:
        stack.start()
        say(_banner(config, args))
        died = stack.watch()
        if died is not None:
            part = next(p for p in stack.parts if p.name == died)
            say(
                f"{died} exited with code {part.process.returncode}; stopping the rest. Its log ends:\n"
                f"{_tail(part.log_path)}"
            )
            code = 1
    except StartFailed as exc:
        say(f"{prog}: {exc}")
        code = 1
    finally:
        stack.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
