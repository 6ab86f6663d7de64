"""`kvbus` itself: its help lists every command with what it does, and a wrong command is refused with that list."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvbus.cli import run

COMMANDS = ("up", "controller", "engine", "agent")


def test_help_lists_every_command_with_a_line_on_what_it_does() -> None:
    # The console script pip installed beside this interpreter, as users run it.
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "kvbus"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stderr == ""
    listed = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("  ")}
    assert listed.keys() == set(COMMANDS)
    assert all(len(words) >= 5 for words in listed.values()), listed
    assert "lmcache_controller" in " ".join(listed["controller"])
    assert "kvbus COMMAND --help" in proc.stdout


@pytest.mark.parametrize(("argv", "first"), [([], "usage: kvbus COMMAND"), (["lookup"], "kvbus: unknown command")])
def test_no_command_or_an_unknown_one_exits_2_listing_the_commands(
    capsys: pytest.CaptureFixture[str], argv: list[str], first: str
) -> None:
    assert run(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(first)
    assert all(f"\n  {name} " in err for name in COMMANDS)
