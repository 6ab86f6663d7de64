"""What an agent does for each command kind, on its own backends. One small function per kind."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from kvbus.agent.backends.base import StorageBackend
from kvbus.shared.messages import Command, CommandKind, Result, ResultStatus


class CommandHandlers:
    def __init__(self, backends: Mapping[str, StorageBackend], instance_id: str, worker_id: int) -> None:
        self._backends = backends
        self._instance = instance_id
        self._worker = worker_id
        self._by_kind: dict[CommandKind, Callable[[Command], Result]] = {CommandKind.CLEAR: self.clear}

    def __call__(self, command: Command) -> Result:
        return self._by_kind[command.kind](command)

    def clear(self, command: Command) -> Result:
        backend = self._backends.get(command.location)
        if backend is None:
            return self._ok(command, 0, detail=f"this worker has no {command.location}")
        return self._ok(command, backend.clear())

    def _ok(self, command: Command, num_tokens: int, *, detail: str = "") -> Result:
        return Result(event_id=command.event_id, instance_id=self._instance, worker_id=self._worker,
                      status=ResultStatus.OK, num_tokens=num_tokens, detail=detail)
