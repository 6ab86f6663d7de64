"""`kvbus engine`: the reference engine, an OpenAI-compatible server whose KV cache the kvbus agent holds."""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from kvbus import logs
from kvbus.engine.app import create_app
from kvbus.ports import PortError, listen, where
from kvbus.shared.config import DEFAULT_MODEL, ConfigError, check_devices, load

log = logging.getLogger("kvbus.engine")


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Serve a tiny random-weight Llama-3-shaped model with the OpenAI completions API; the kvbus "
            "agent inside keeps and reuses its prompts' KV and obeys the controller."
        ),
    )
    parser.add_argument("--config", help="LMCache/kvbus yaml (default: $LMCACHE_CONFIG_FILE, if set)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"served model name (default {DEFAULT_MODEL})")
    parser.add_argument(
        "--redis-url",
        help=(
            "override redis_url from the config; "
            "a URL with a password belongs in $LMCACHE_REDIS_URL or the config file, since every user can read "
            "a command line"
        ),
    )
    parser.add_argument("--instance-id", help="override lmcache_instance_id from the config")
    parser.add_argument("--seed", type=int, default=0, help="weight seed; engines that share KV need the same one")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: list[str] | None = None, prog: str = "kvbus engine") -> int:
    args = _parser(prog).parse_args(argv)
    logs.setup(args.log_level)
    overrides = {
        k: v for k, v in {"redis_url": args.redis_url, "lmcache_instance_id": args.instance_id}.items() if v is not None
    }
    try:
        config = load(args.config).with_overrides(enable_controller=True, **overrides)
        check_devices(config)
        if not 0 < args.port < 65536:
            raise ConfigError(f"--port {args.port} is not a TCP port")
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    try:
        # Bound before the model is built and the agent registers: a taken port stops it here, holder named.
        sockets = listen(args.host, args.port, "HTTP port")
    except PortError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    address = where(args.host, args.port)
    log.info(
        "engine listening on http://%s as %s (%s)", address, config.lmcache_instance_id, logs.run_facts(args.config)
    )
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config, args.model, seed=args.seed),
            log_level=args.log_level,
            access_log=False,
            timeout_graceful_shutdown=30,
        )
    )
    server.run(sockets=sockets)
    # What uvicorn.run answers when the server never started.
    return 0 if server.started else STARTUP_FAILURE


if __name__ == "__main__":
    sys.exit(main())
