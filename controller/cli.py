"""`kvbus controller` (alias `lmcache_controller`): LMCache's controller flags, served by uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import msgspec
import uvicorn
from uvicorn.config import STARTUP_FAILURE

from kvbus import logs
from kvbus.controller.app import create_app
from kvbus.controller.lmcache.monitor import MonitorPorts
from kvbus.ports import PortError, check_free, listen, where
from kvbus.shared.config import ConfigError, load

log = logging.getLogger("kvbus.controller")

API_TOKEN_ENV = "KVBUS_API_TOKEN"


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Serve LMCache's controller API (/lookup, /clear) over a Redis stream bus and index. "
            "Stateless: run as many as you like against one Redis."
        ),
    )
    # Defaults are None so that only flags actually given override the config file.
    parser.add_argument("--host", help="address to bind (default: controller_host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (default: controller_port, 9000)")
    ports = parser.add_mutually_exclusive_group()
    ports.add_argument(
        "--monitor-ports",
        help=(
            'LMCache workers\' sockets, as LMCache 0.5.6 takes them: \'{"pull": P1, "reply": P2, "heartbeat": P3}\' '
            "(heartbeat optional; without it LMCache workers send none and are checked by health messages). "
            "Default: controller_monitor_ports, else none bound"
        ),
    )
    ports.add_argument(
        "--monitor-port",
        type=int,
        help="the seed's single port P: pull on P, reply on P+1, heartbeat on P+2",
    )
    parser.add_argument(
        "--redis-url",
        help=(
            "Redis bus and index (default: redis_url, redis://127.0.0.1:6379/0); "
            "a URL with a password belongs in $LMCACHE_REDIS_URL or the config file, since every user can read "
            "a command line"
        ),
    )
    parser.add_argument("--config", help="LMCache/kvbus yaml (default: $LMCACHE_CONFIG_FILE, if set)")
    parser.add_argument(
        "--command-timeout",
        type=float,
        help="seconds to wait for an agent before answering 504 (default: command_timeout, 5)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: list[str] | None = None, prog: str = "lmcache_controller") -> int:
    args = _parser(prog).parse_args(argv)
    logs.setup(args.log_level)
    monitor_ports = args.monitor_ports
    if args.monitor_port is not None:
        monitor_ports = msgspec.json.encode(msgspec.structs.asdict(MonitorPorts.of_port(args.monitor_port))).decode()
    overrides = {
        key: value
        for key, value in {
            "controller_host": args.host,
            "controller_port": args.port,
            "redis_url": args.redis_url,
            "command_timeout": args.command_timeout,
            "controller_monitor_ports": monitor_ports,
            # The API token comes from the environment, never from a flag: a command line is public
            # (ps, /proc), and this name needs no LMCACHE_ prefix nor a file.
            "api_token": os.environ.get(API_TOKEN_ENV) or None,
        }.items()
        if value is not None
    }
    try:
        config = load(args.config).with_overrides(**overrides)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    try:
        # Bound before anything says "listening" or "ready": a taken port stops it here, holder named.
        sockets = listen(config.controller_host, config.controller_port, "HTTP port")
        # LMCache's sockets are bound by the app once it starts; checked now so that a taken one
        # is reported like the HTTP port, not as a failed start-up after "ready".
        for name, port in (config.controller_monitor_ports or {}).items():
            check_free(config.controller_host, port, f"LMCache {name} port")
    except PortError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    address = where(config.controller_host, config.controller_port)
    log.info("controller listening on http://%s (%s)", address, logs.run_facts(args.config))
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            log_level=args.log_level,
            # In-flight requests end within the command timeout, so SIGTERM waits for them, never forever.
            timeout_graceful_shutdown=int(config.command_timeout) + 2,
            access_log=False,
        )
    )
    server.run(sockets=sockets)
    # What uvicorn.run answers when the server never started.
    return 0 if server.started else STARTUP_FAILURE


if __name__ == "__main__":
    sys.exit(main())
