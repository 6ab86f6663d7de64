"""Tickets: the controller's leave for each source rank of a /move to send chunks into its destination rank.

An agent's peer endpoint takes chunks only from a sender that shows a ticket (agent/peer.py), so reaching
the endpoint is not enough to write KV into an instance: a controller must have asked for the transfer.
A ticket is TICKET_BYTES random bytes. The command carries them to the source rank, and Redis keeps what
they allow (`records.MoveTicket`) under a key named by their digest (`keys.ticket`). The receiver deletes
the record as it reads it, so a ticket serves one transfer, and the record expires with the command's
deadline, so one that goes unused (the source held nothing there, or died first) leaves nothing behind.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

from kvbus.shared import keys, redis_conn
from kvbus.shared.messages import TICKET_BYTES
from kvbus.shared.records import MoveTicket


async def issue_tickets(
    client: redis_conn.AsyncClient, dest_instance: str, grants: Mapping[str, MoveTicket], ttl_ms: int
) -> dict[str, str]:
    """Write a ticket into `dest_instance` for each source worker (the keys of `grants`) allowing what its
    grant says; returns each worker's token, in hex, for the command to carry."""
    tokens: dict[str, str] = {}
    # One transaction: a ticket is never left without its expiry, whatever happens to the connection.
    pipe = client.pipeline(transaction=True)
    for worker, grant in grants.items():
        token = secrets.token_bytes(TICKET_BYTES)
        key = keys.ticket(dest_instance, token)
        pipe.hset(key, mapping=grant.encode())
        pipe.pexpire(key, ttl_ms)
        tokens[worker] = token.hex()
    await pipe.execute()
    return tokens
