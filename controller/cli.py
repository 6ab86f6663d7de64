"""`kvbus controller` (alias `lmcache_controller`): LMCache's controller flags, served by uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from kvbus import logs
from kvbus.controller.app import create_app
from kvbus.shared.config import ConfigError, load

log = logging.getLogger("kvbus.controller")


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
    parser.add_argument(
        "--monitor-port",
        type=int,
        default=9001,
        help=(
            "port reserved for the LMCache worker bridge, which will let unmodified LMCache workers report "
            "over ZMQ as they do to LMCache's controller. Accepted for LMCache CLI compatibility; "
            "kvbus agents talk through Redis and do not use it yet"
        ),
    )
    parser.add_argument("--redis-url", help="Redis bus and index (default: redis_url, redis://127.0.0.1:6379/0)")
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
    overrides = {
        key: value
        for key, value in {
            "controller_host": args.host,
            "controller_port": args.port,
            "redis_url": args.redis_url,
            "command_timeout": args.command_timeout,
        }.items()
        if value is not None
    }
    try:
        config = load(args.config).with_overrides(**overrides)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    log.info(
        "controller listening on http://%s:%d (monitor port %d reserved)",
        config.controller_host,
        config.controller_port,
        args.monitor_port,
    )
    uvicorn.run(
        create_app(config),
        host=config.controller_host,
        port=config.controller_port,
        log_level=args.log_level,
        # In-flight requests end within the command timeout, so SIGTERM waits for them, never forever.
        timeout_graceful_shutdown=int(config.command_timeout) + 2,
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
