"""`kvbus <command>`: one entry point for the controller, the agent, the reference engine and `up`."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    commands = {
        "controller": "kvbus.controller.cli",
        "agent": "kvbus.agent.cli",
        "engine": "kvbus.engine.cli",
        "up": "kvbus.up",
    }
    if not args or args[0] not in commands:
        print(
            "usage: kvbus {up,controller,engine,agent} [options]   (kvbus COMMAND --help for its options)",
            file=sys.stderr,
        )
        return 0 if args and args[0] in ("-h", "--help") else 2
    module = __import__(commands[args[0]], fromlist=["main"])
    return int(module.main(args[1:], prog=f"kvbus {args[0]}"))


if __name__ == "__main__":
    sys.exit(main())
