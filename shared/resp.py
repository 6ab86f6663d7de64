"""RESP encoding of commands for senders whose arguments are many: an index writer's HSET of a thousand fields.

redis-py encodes each argument in Python (a type check, an encode and a length per argument), which
costs more than Redis spends executing the command. These build the same bytes with a few joins
over the whole argument list at once. ASCII text (chunk keys are hex digests) takes the fast way;
anything else is encoded argument by argument, as redis-py would. Senders that skip redis-py also
read one reply shape themselves: a stream read's entries (`stream_entries`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import chain, compress, repeat
from typing import Any, cast

import hiredis

# One command of few arguments, packed by hiredis in C; its stub declares a tuple of one argument.
pack = cast(Callable[[tuple[str | int | bytes, ...]], bytes], hiredis.pack_command)

# A stream entry as redis-py's client gives it: its id and fields, None when it was trimmed while pending.
Entry = tuple[str, dict[str, str] | None]


def stream_entries(raw: Any) -> list[Entry]:
    """The entries of an XREAD or XREADGROUP reply of one stream, as hiredis parsed it."""
    if not raw:
        return []
    # RESP2 gives [[stream, entries]], RESP3 {stream: entries}; an entry is [id, [name, value, ...]],
    # its fields nil when it was trimmed while pending.
    entries = next(iter(raw.values())) if isinstance(raw, dict) else raw[0][1]
    return [
        (entry_id, None if not flat else dict(zip(flat[::2], flat[1::2], strict=True))) for entry_id, flat in entries
    ]


def _bulk(arg: str | int) -> bytes:
    data = str(arg).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def command(*args: str | int) -> bytes:
    """One command, `args` its name and arguments."""
    return b"*%d\r\n" % len(args) + b"".join(map(_bulk, args))


def _lengths(strings: Sequence[str]) -> map[str]:
    """`$<len>\r\n` for each of `strings` (ASCII: its length in characters is its length in bytes)."""
    prefixes = {n: f"${n}\r\n" for n in set(map(len, strings))}
    return map(prefixes.__getitem__, map(len, strings))


# Past this many distinct values, grouping the fields by value costs more than encoding them one by one.
_GROUPS = 8


def hset(key: str, names: Sequence[str], values: Sequence[int]) -> bytes:
    """HSET `key` with the field `names[i]` set to `values[i]` for every i; at least one field."""
    distinct = set(values)
    pieces = {n: f"\r\n${len(str(n))}\r\n{n}\r\n" for n in distinct}
    lengths = set(map(len, names))
    if len(lengths) == 1 and len(distinct) <= _GROUPS:
        # Names of one length (chunk keys of one hash space): each group of one value is a single join.
        prefix = f"${next(iter(lengths))}\r\n"
        groups = [(distinct.pop(), names)] if len(distinct) == 1 else _grouped(names, values, distinct)
        body = "".join(prefix + (pieces[n] + prefix).join(group) + pieces[n] for n, group in groups)
    else:
        body = "".join(chain.from_iterable(zip(_lengths(names), names, map(pieces.__getitem__, values), strict=True)))
    if not body.isascii():
        fields: list[str | int] = []
        for name, value in zip(names, values, strict=True):
            fields += (name, value)
        return command("HSET", key, *fields)
    return b"*%d\r\n$4\r\nHSET\r\n%s%s" % (2 + 2 * len(names), _bulk(key), body.encode())


def _grouped(names: Sequence[str], values: Sequence[int], distinct: set[int]) -> list[tuple[int, Sequence[str]]]:
    return [(n, list(compress(names, map(n.__eq__, values)))) for n in distinct]


def each(name: str, keys: Sequence[str], arg: str) -> bytes:
    """The command `name key arg` once for each of `keys`, one after another: len(keys) commands, len(keys) replies."""
    head = f"*3\r\n${len(name)}\r\n{name}\r\n"
    tail = "\r\n" + _bulk(arg).decode()
    body = "".join(chain.from_iterable(zip(repeat(head), _lengths(keys), keys, repeat(tail))))
    if not body.isascii():
        return b"".join(command(name, key, arg) for key in keys)
    return body.encode()
