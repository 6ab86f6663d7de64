"""What an agent does for each command kind, on the backend at the command's location.

A request that cannot be carried out here (an unknown compression method, compression on a
backend without it, a move to a location this worker lacks) raises Refused and is answered
REFUSED with the reason: a client's mistake, not the agent's failure. Any other exception
leaves the handler, and the consumer answers it ERROR.

The controller accepts any integer as a token id, as LMCache does. No chunk holds an id outside
0..2**32-1 (no tokenizer makes one), so a command's held prefix ends before the chunk of the first
such id: the handlers act on the whole chunks before it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import msgspec

from kvbus.agent import peer
from kvbus.agent.backends.base import StorageBackend
from kvbus.agent.refused import Refused
from kvbus.shared.hashing import TOKEN_LIMIT, HashSpace
from kvbus.shared.messages import Command, CommandKind, Result, ResultStatus

# LMCache's health codes.
HEALTHY = 0
MEMCHECK_FAILED = -1


class CommandHandlers:
    def __init__(
        self,
        backends: Mapping[str, StorageBackend],
        instance_id: str,
        worker_id: int,
        *,
        space: HashSpace,
        transfer_timeout_s: float,
    ) -> None:
        self._backends = backends
        self._instance = instance_id
        self._worker = worker_id
        self._space = space
        self._transfer_timeout_s = transfer_timeout_s
        # What each kind does to the backend at the command's location, as the tokens it affected.
        self._counted: dict[CommandKind, Callable[[StorageBackend, Command], int]] = {
            CommandKind.CLEAR: lambda backend, command: backend.clear(),
            CommandKind.PIN: lambda backend, command: backend.pin(command.tokens),
            CommandKind.UNPIN: lambda backend, command: backend.unpin(command.tokens),
            CommandKind.COMPRESS: lambda backend, command: backend.compress(command.tokens, command.method),
            CommandKind.DECOMPRESS: lambda backend, command: backend.decompress(command.tokens, command.method),
        }

    def __call__(self, command: Command) -> Result:
        if command.kind == CommandKind.HEALTH:
            return self.health(command)
        backend = self._backends.get(command.location)
        if backend is None:
            return self._answer(command, detail=f"this worker has no {command.location}")
        holdable = self._holdable(command)
        if holdable is None:
            return self._answer(command, detail="no chunk of these tokens is held: the first has an id past 2**32-1")
        command = holdable
        try:
            if command.kind == CommandKind.MOVE:
                return self.move(backend, command)
            return self._answer(command, num_tokens=self._counted[command.kind](backend, command))
        except Refused as exc:
            return self._answer(command, ResultStatus.REFUSED, detail=str(exc))

    def _holdable(self, command: Command) -> Command | None:
        """`command` with its tokens cut before the chunk of the first id outside 0..2**32-1; None when
        that is the first chunk (an empty list would mean every chunk)."""
        first_bad = next((n for n, t in enumerate(command.tokens) if not 0 <= t < TOKEN_LIMIT), None)
        if first_bad is None:
            return command
        cut = first_bad - first_bad % self._space.chunk_size
        return msgspec.structs.replace(command, tokens=command.tokens[:cut]) if cut else None

    def move(self, source: StorageBackend, command: Command) -> Result:
        """Copy the held prefix of `tokens` (every chunk, if empty) to the destination, then drop
        what arrived from here unless `should_copy`.

        The source drops nothing until the destination holds the chunks, so a destination that
        dies midway leaves the source as it was.
        """
        entries, tensors = source.export(command.tokens)
        if not entries:
            return self._answer(command, detail="nothing of that is held here")
        worker = str(self._worker)
        peer_url = command.peers.get(worker)
        if peer_url is None:
            target = self._backends.get(command.dest_location)
            if target is None:
                raise Refused(f"this worker has no {command.dest_location} to move chunks to")
            arrived = set(target.adopt(entries, tensors))
        else:
            try:
                arrived = set(
                    peer.send(
                        peer_url,
                        command.tickets.get(worker, ""),
                        self._space,
                        command.dest_location,
                        entries,
                        tensors,
                        self._transfer_timeout_s,
                    )
                )
            except peer.TransferFailed as exc:
                return self._answer(command, ResultStatus.ERROR, detail=f"{exc}; the source keeps its chunks")
        moved = [entry for entry in entries if entry.key in arrived]
        if not command.should_copy:
            for entry in moved:
                source.discard(entry.key)
        return self._answer(command, num_tokens=sum(entry.num_tokens for entry in moved))

    def health(self, command: Command) -> Result:
        """Every backend is within its capacity, so stores can still be admitted."""
        problems = [
            f"{b.location} holds {b.used_bytes} B, over its {b.capacity_bytes} B"
            for b in self._backends.values()
            if b.used_bytes > b.capacity_bytes
        ]
        return self._answer(command, error_code=MEMCHECK_FAILED if problems else HEALTHY, detail="; ".join(problems))

    def _answer(
        self,
        command: Command,
        status: ResultStatus = ResultStatus.OK,
        *,
        num_tokens: int = 0,
        error_code: int = 0,
        detail: str = "",
    ) -> Result:
        return Result(
            event_id=command.event_id,
            instance_id=self._instance,
            worker_id=self._worker,
            status=status,
            num_tokens=num_tokens,
            error_code=error_code,
            detail=detail,
        )
