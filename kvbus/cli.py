"""`kvbus <command>`: one entry point for the controller, the agent, the reference engine and `up`."""

from __future__ import annotations

import atexit
import importlib
import os
import sys
import threading
from typing import NoReturn

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


def run(argv: list[str]) -> int:
    """Run the command `argv` names; its exit status."""
    if argv and argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0
    if not argv or argv[0] not in COMMANDS:
        unknown = f"kvbus: unknown command {argv[0]!r}\n" if argv else ""
        print(unknown + usage(), end="", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:], prog=f"kvbus {argv[0]}"))


def main() -> int:
    """The `kvbus` program: run the command, then end the process at once (see `_exit`)."""
    code = run(sys.argv[1:])
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return code  # the interpreter joins threads still working, and only it knows how to stop them all
    _exit(code)


def _exit(code: int) -> NoReturn:
    """End the process without the interpreter's teardown, once the command has finished.

    With torch loaded, tearing down its modules and objects takes 0.5 to 2 s after a stopped agent
    has said "stopped" and has nothing left to do; a supervisor would wait that long for the pid.
    What must still happen does: the atexit hooks (logging's flush among them) and stdio flushes.
    """
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
