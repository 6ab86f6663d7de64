"""Command handlers: what each command does to the backend at its location, and which failures are refusals."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from kvbus.agent.backends.cpu import LocalCPUBackend
from kvbus.agent.backends.disk import LocalDiskBackend
from kvbus.agent.handlers import CommandHandlers
from kvbus.agent.synthetic import synthetic_kv
from kvbus.shared.hashing import HashSpace
from kvbus.shared.messages import Command, CommandKind, ResultStatus
from tests.conftest import MODEL

SPACE = HashSpace(MODEL, 256)
PROMPT = list(range(500, 1100))  # chunks of 256, 256 and 88


def command(
    kind: CommandKind,
    location: str = "LocalCPUBackend",
    *,
    tokens: Sequence[int] = (),
    method: str = "",
    dest_location: str = "",
) -> Command:
    return Command(
        event_id="E1",
        kind=kind,
        reply_to="r",
        timeout_ms=5000,
        location=location,
        tokens=list(tokens),
        method=method,
        dest_location=dest_location,
    )


@pytest.fixture
def handlers(tmp_path: Path) -> CommandHandlers:
    cpu = LocalCPUBackend(SPACE, 1 << 30)
    cpu.store(PROMPT, synthetic_kv(SPACE, PROMPT))
    disk = LocalDiskBackend(SPACE, tmp_path, 1 << 30)
    return CommandHandlers(
        {"LocalCPUBackend": cpu, "LocalDiskBackend": disk}, "i", 0, space=SPACE, transfer_timeout_s=2
    )


@pytest.mark.parametrize(
    ("asked", "reason"),
    [
        (
            command(CommandKind.COMPRESS, method="gzip"),
            "unknown compression method 'gzip'; known methods: int8, zlib, zstd, cachegen",
        ),
        (
            command(CommandKind.DECOMPRESS, "LocalDiskBackend", method="zlib"),
            "LocalDiskBackend does not support decompress",
        ),
        (command(CommandKind.PIN, "LocalDiskBackend", tokens=PROMPT), "LocalDiskBackend does not support pin"),
        (
            command(CommandKind.MOVE, tokens=PROMPT, dest_location="LocalGPUBackend"),
            "this worker has no LocalGPUBackend to move chunks to",
        ),
        (
            command(CommandKind.COMPRESS, method="cachegen"),
            "cachegen is LMCache's own compression method, which LMCache workers run and kvbus agents do not "
            "implement; kvbus agents compress with int8, zlib, zstd",
        ),
    ],
    ids=["unknown-method", "decompress-on-disk", "pin-on-disk", "move-nowhere", "lmcache-s-cachegen"],
)
def test_a_client_s_mistake_is_refused_with_the_reason(handlers: CommandHandlers, asked: Command, reason: str) -> None:
    result = handlers(asked)
    assert (result.status, result.detail, result.num_tokens) == (ResultStatus.REFUSED, reason, 0)


@pytest.mark.parametrize("bad", [-1, 2**32, 2**70])
def test_a_token_id_no_chunk_can_hold_ends_the_prefix_before_its_chunk(handlers: CommandHandlers, bad: int) -> None:
    """The controller accepts any integer as a token id, as LMCache does; the held prefix stops before it."""
    assert handlers(command(CommandKind.PIN, tokens=[*PROMPT[:300], bad, *PROMPT[301:]])).num_tokens == 256
    assert handlers(command(CommandKind.PIN, tokens=[*PROMPT[:512], bad])).num_tokens == 512
    # Within the first chunk: nothing, and not every chunk (which an empty list would mean).
    for kind in (CommandKind.PIN, CommandKind.COMPRESS, CommandKind.MOVE):
        kept = handlers(command(kind, tokens=[PROMPT[0], bad], method="zlib", dest_location="LocalDiskBackend"))
        assert (kept.status, kept.num_tokens) == (ResultStatus.OK, 0), kind


def test_any_other_failure_is_not_a_refusal(handlers: CommandHandlers, monkeypatch: pytest.MonkeyPatch) -> None:
    """It leaves the handler, and the consumer answers it ERROR."""

    def pin(self: LocalCPUBackend, tokens: Sequence[int]) -> int:
        raise ValueError("a bug, not the client's mistake")

    monkeypatch.setattr(LocalCPUBackend, "pin", pin)
    with pytest.raises(ValueError, match="a bug"):
        handlers(command(CommandKind.PIN, tokens=PROMPT))


def test_a_local_move_goes_between_backends_and_a_copy_keeps_the_source() -> None:
    cpu, other = LocalCPUBackend(SPACE, 1 << 30), LocalCPUBackend(SPACE, 1 << 30)
    cpu.store(PROMPT, synthetic_kv(SPACE, PROMPT))
    handlers = CommandHandlers(
        {"LocalCPUBackend": cpu, "LocalDiskBackend": other}, "i", 0, space=SPACE, transfer_timeout_s=2
    )

    def move(tokens: list[int], copy: bool) -> int:
        return handlers(
            Command(
                event_id=f"Move{copy}",
                kind=CommandKind.MOVE,
                reply_to="r",
                timeout_ms=5000,
                location="LocalCPUBackend",
                tokens=tokens,
                dest_location="LocalDiskBackend",
                should_copy=copy,
            )
        ).num_tokens

    assert move(PROMPT[:300], copy=True) == 256
    assert cpu.contains(PROMPT) == 600 and other.contains(PROMPT) == 256
    assert move(PROMPT, copy=False) == 600
    assert cpu.contains(PROMPT) == 0 and other.contains(PROMPT) == 600
    assert move(PROMPT, copy=False) == 0  # nothing left to move
    cpu.store([9] * 300, synthetic_kv(SPACE, [9] * 300))
    assert move([], copy=False) == 300  # no tokens: every chunk
    assert len(cpu) == 0 and other.contains([9] * 300) == 300
