"""`kvbus agent`: a standalone agent process, for demos and tests until an engine hosts one.

It registers the instance named in the config, optionally preloads KV for prompts (text
or token ids), serves the controller's commands, and on SIGTERM or Ctrl-C deregisters.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from kvbus import logs
from kvbus.agent.agent import Agent
from kvbus.agent.synthetic import synthetic_kv
from kvbus.agent.tokenizer import encode_prompt
from kvbus.shared.config import DEFAULT_MODEL, ConfigError, check_devices, load

log = logging.getLogger("kvbus.agent")


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--config", required=True, help="LMCache/kvbus yaml (enable_controller must be true)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model name the KV belongs to ({DEFAULT_MODEL})")
    parser.add_argument("--worker-id", type=int, default=0, help="this worker's rank within the instance")
    parser.add_argument(
        "--redis-url",
        help=(
            "override redis_url from the config; "
            "a URL with a password belongs in $LMCACHE_REDIS_URL or the config file, since every user can read "
            "a command line"
        ),
    )
    parser.add_argument("--instance-id", help="override lmcache_instance_id from the config")
    parser.add_argument(
        "--preload-text",
        action="append",
        default=[],
        metavar="TEXT",
        help="prompt whose (synthetic) KV to hold from the start; repeatable",
    )
    parser.add_argument(
        "--preload-tokens",
        action="append",
        default=[],
        metavar="IDS",
        help="comma-separated token ids to hold KV for, or @FILE holding them; repeatable",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def _prompts(args: argparse.Namespace) -> list[list[int]]:
    prompts = [encode_prompt(text, args.model) for text in args.preload_text]
    for ids in args.preload_tokens:
        if ids.startswith("@"):
            # A long prompt does not fit in one command-line argument (128 KiB on Linux).
            ids = Path(ids[1:]).read_text()
        try:
            prompts.append([int(t) for t in ids.replace(" ", "").split(",") if t])
        except ValueError:
            raise ValueError(f"--preload-tokens {ids!r}: expected comma-separated integers") from None
    return prompts


def main(argv: list[str] | None = None, prog: str = "kvbus agent") -> int:
    args = _parser(prog).parse_args(argv)
    logs.setup(args.log_level)
    overrides = {
        k: v for k, v in {"redis_url": args.redis_url, "lmcache_instance_id": args.instance_id}.items() if v is not None
    }
    try:
        config = load(args.config).with_overrides(**overrides)
        if not config.enable_controller:
            raise ConfigError(f"enable_controller is false in {args.config}; set it to True to join the bus")
        check_devices(config)
        prompts = _prompts(args)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2

    log.info(
        "agent starting as %s worker %d (%s)", config.lmcache_instance_id, args.worker_id, logs.run_facts(args.config)
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    agent = Agent(config, model=args.model, worker_id=args.worker_id)
    if not agent.start_when_reachable(stop):
        return 0
    for tokens in prompts:
        held = agent.tiers.store(tokens, synthetic_kv(agent.space, tokens))
        log.info("preloaded %d of %d tokens (%d chunks)", held, len(tokens), len(agent.space.chunks(tokens)))
    stop.wait()
    log.info("stopping on signal")
    agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
