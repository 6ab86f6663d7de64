"""Commands and results as they travel on the bus's Redis streams.

Each message goes as a flat set of readable stream fields through `flat_fields` (`redis-cli XRANGE`
shows them as they are). Everything else kvbus keeps in Redis is declared in `records.py`.
"""

from __future__ import annotations

from enum import StrEnum

import msgspec


class CommandKind(StrEnum):
    CLEAR = "clear"
    PIN = "pin"
    UNPIN = "unpin"
    COMPRESS = "compress"
    DECOMPRESS = "decompress"
    HEALTH = "health"
    MOVE = "move"


class ResultStatus(StrEnum):
    OK = "ok"
    EXPIRED = "expired"  # arrived after its deadline; nothing was done
    ERROR = "error"  # the agent tried and failed; `detail` says why
    REFUSED = "refused"  # the request cannot be done there (say, compress on disk); nothing was done


# A ticket's token: random bytes, as many as a SHA-256 digest, so that guessing one is hopeless.
TICKET_BYTES = 32


class Command(msgspec.Struct, frozen=True, kw_only=True):
    event_id: str
    kind: CommandKind
    reply_to: str  # the result stream of the controller process that waits
    timeout_ms: int  # counted from the stream entry's id, which is Redis server time
    location: str = ""
    tokens: list[int] = msgspec.field(default_factory=list)  # empty: every chunk at `location`
    method: str = ""  # compression method, for compress and decompress
    # move: where the chunks go. peers: the destination worker's peer endpoint for each source
    # worker (host:port), absent when they stay within the instance.
    dest_location: str = ""
    peers: dict[str, str] = msgspec.field(default_factory=dict)  # worker id (as text) -> host:port
    # The token (hex) of the ticket each source worker shows its peer, which takes chunks only with one
    # (controller/tickets.py); absent with `peers`.
    tickets: dict[str, str] = msgspec.field(default_factory=dict)  # worker id (as text) -> token
    should_copy: bool = False


class Result(msgspec.Struct, frozen=True, kw_only=True):
    event_id: str
    instance_id: str
    worker_id: int
    status: ResultStatus
    num_tokens: int = 0
    error_code: int = 0  # health: LMCache's codes, 0 healthy
    detail: str = ""
