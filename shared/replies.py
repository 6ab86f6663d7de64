"""How a worker's answer to a command goes back, the same for kvbus agents and for the controller
that relays commands to LMCache workers: in one pipeline, the `done` mark that stops a redelivery
from running twice, the result in the command record (/check_finish), the journal entry, and the
result on the stream of the controller that waits.
"""

from __future__ import annotations

from itertools import chain

from kvbus.shared import keys, redis_conn
from kvbus.shared.flat_fields import Fields, encode
from kvbus.shared.messages import Command, Result
from kvbus.shared.records import CommandRecord, JournaledResult

# A done mark outlives its command's deadline by this much. A redelivery later than that, without
# a mark, is past its deadline: nobody waits for it, so it is acked unanswered.
DONE_GRACE_S = 60
RESULTS_MAXLEN = 10_000

Args = tuple[str | int, ...]


def deadline_ms(entry_id: str, command: Command) -> int:
    """When the command's answer is due, in Redis server time: its stream entry id stamps when it was sent."""
    return int(entry_id.split("-", 1)[0]) + command.timeout_ms


def reply_commands(command: Command, result: Result, *, retention_s: int) -> list[Args]:
    """Every write of one answer, as the Redis commands to send in this order (with the caller's XACK after).

    Spelled as plain argument lists so that a sender may pack them itself: the agent's command thread
    sends them over a connection of its own, at a fraction of what a redis-py pipeline costs it.
    """
    record = keys.command_record(command.event_id)
    return [
        (
            "SET",
            keys.done(result.instance_id, result.worker_id, command.event_id),
            result.num_tokens,
            "EX",
            command.timeout_ms // 1000 + DONE_GRACE_S,
        ),
        ("HSET", record, CommandRecord.result_field(result.worker_id), CommandRecord.result_value(result)),
        # The controller set the record's retention; this only keeps a record it never made from leaking.
        ("EXPIRE", record, retention_s, "NX"),
        _xadd(keys.JOURNAL, JournaledResult.of(result), keys.JOURNAL_MAXLEN),
        # NOMKSTREAM: a result stream that is gone belongs to a controller that is gone.
        _xadd(command.reply_to, encode(result), RESULTS_MAXLEN, "NOMKSTREAM"),
    ]


def queue_reply(
    pipe: redis_conn.Pipeline | redis_conn.AsyncPipeline,
    command: Command,
    result: Result,
    *,
    retention_s: int,
) -> None:
    """Queue every write of one answer on `pipe`; the caller executes it (with its XACK)."""
    for args in reply_commands(command, result, retention_s=retention_s):
        pipe.execute_command(*args)


def _xadd(stream: str, fields: Fields, maxlen: int, *options: str) -> Args:
    pairs = chain.from_iterable((str(name), str(value)) for name, value in fields.items())
    return ("XADD", stream, *options, "MAXLEN", "~", maxlen, "*", *pairs)
