"""How a worker's answer to a command goes back, the same for kvbus agents and for the controller
that relays commands to LMCache workers: in one pipeline, the `done` mark that stops a redelivery
from running twice, the result in the command record (/check_finish), the journal entry, and the
result on the stream of the controller that waits.
"""

from __future__ import annotations

from kvbus.shared import keys, redis_conn
from kvbus.shared.flat_fields import encode
from kvbus.shared.messages import Command, Result
from kvbus.shared.records import CommandRecord, JournaledResult

# A done mark outlives its command's deadline by this much. A redelivery later than that, without
# a mark, is past its deadline: nobody waits for it, so it is acked unanswered.
DONE_GRACE_S = 60
RESULTS_MAXLEN = 10_000


def deadline_ms(entry_id: str, command: Command) -> int:
    """When the command's answer is due, in Redis server time: its stream entry id stamps when it was sent."""
    return int(entry_id.split("-", 1)[0]) + command.timeout_ms


def queue_reply(
    pipe: redis_conn.Pipeline | redis_conn.AsyncPipeline,
    command: Command,
    result: Result,
    *,
    retention_s: int,
) -> None:
    """Queue every write of one answer on `pipe`; the caller executes it (with its XACK)."""
    pipe.set(
        keys.done(result.instance_id, result.worker_id, command.event_id),
        result.num_tokens,
        ex=command.timeout_ms // 1000 + DONE_GRACE_S,
    )
    record = keys.command_record(command.event_id)
    pipe.hset(record, CommandRecord.result_field(result.worker_id), CommandRecord.result_value(result))
    # The controller set the record's retention; this only keeps a record it never made from leaking.
    pipe.expire(record, retention_s, nx=True)
    pipe.xadd(keys.JOURNAL, JournaledResult.of(result), maxlen=keys.JOURNAL_MAXLEN, approximate=True)
    # NOMKSTREAM: a result stream that is gone belongs to a controller that is gone.
    pipe.xadd(command.reply_to, encode(result), maxlen=RESULTS_MAXLEN, approximate=True, nomkstream=True)
