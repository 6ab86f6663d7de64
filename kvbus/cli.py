"""`kvbus <command>`: one entry point for the controller, the agent, the reference engine and `up`."""

from __future__ import annotations

import importlib
import sys

import kvbus

# Each command's module and one line on what it does. A module is imported only when its command
# runs, so `kvbus --help` and `kvbus controller` never load torch.
COMMANDS = {
    "up": ("kvbus.up", "start Redis (if none answers), the controller and a reference engine; Ctrl-C stops them all"),
    "controller": (
        "kvbus.controller.cli",
        "serve LMCache's controller API (/lookup, /clear, ...) over Redis; the same program as lmcache_controller",
    ),
    "engine": (
        "kvbus.engine.cli",
        "serve a tiny OpenAI-compatible model whose prompts' KV its embedded kvbus agent keeps and reuses",
    ),
    "agent": (
        "kvbus.agent.cli",
        "run a standalone agent: register an instance, hold KV for preloaded prompts, obey the controller",
    ),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    listed = "\n".join(f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items())
    return (
        f"usage: kvbus COMMAND [options]\n\n{kvbus.__doc__}\n\ncommands:\n{listed}\n\n"
        "`kvbus COMMAND --help` gives a command's options and their defaults.\n"
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0
    if not args or args[0] not in COMMANDS:
        unknown = f"kvbus: unknown command {args[0]!r}\n" if args else ""
        print(unknown + usage(), end="", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[args[0]][0])
    return int(module.main(args[1:], prog=f"kvbus {args[0]}"))


if __name__ == "__main__":
    sys.exit(main())
