"""Event ids, built and recognised in one place: LMCache's shape, an operation's name followed by a uuid4.

Commands are stored under their id (records.CommandRecord). Lookups and queries are answered in
the request that creates their id, so /check_finish knows them as finished by the id alone and
the lookup path stays free of writes.
"""

from __future__ import annotations

import os
import uuid
from enum import StrEnum

from kvbus.shared.messages import CommandKind


class Operation(StrEnum):
    """Each operation's prefix, as LMCache spells it (health's lowercase included)."""

    LOOKUP = "Lookup"
    QUERY_WORKER_INFO = "QueryWorkerInfo"
    QUERY_INSTANCE = "QueryInst"
    CLEAR = "Clear"
    PIN = "Pin"
    UNPIN = "Unpin"
    COMPRESS = "Compress"
    DECOMPRESS = "Decompress"
    MOVE = "Move"
    HEALTH = "health"

    @classmethod
    def of(cls, kind: CommandKind) -> Operation:
        return cls[kind.name]


_ANSWERED_IN_REQUEST = (Operation.LOOKUP, Operation.QUERY_WORKER_INFO, Operation.QUERY_INSTANCE)


_VARIANT = "89ab"  # a uuid4's 17th hex digit: its two top bits are 10


def new(operation: Operation) -> str:
    # The text of a uuid4 from its 16 random bytes, as uuid.uuid4() prints it: building the UUID object to
    # print it took twice as long, and every request makes an id.
    h = os.urandom(16).hex()
    return f"{operation}{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def answered_in_request(event_id: str) -> bool:
    """Whether `event_id` is one this controller API creates for a lookup or a query."""
    for operation in _ANSWERED_IN_REQUEST:
        if event_id.startswith(operation):
            return _is_uuid4(event_id[len(operation) :])
    return False


def _is_uuid4(text: str) -> bool:
    try:
        parsed = uuid.UUID(text)
    except ValueError:
        return False
    return parsed.version == 4 and str(parsed) == text
