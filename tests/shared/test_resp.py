"""shared/resp encodes exactly what redis-py would send, fast way or not."""

from __future__ import annotations

import pytest
import redis

from kvbus.shared import resp


def packed(*args: str | int) -> bytes:
    return b"".join(redis.Connection().pack_command(*args))


def test_a_command_is_encoded_as_redis_py_encodes_it() -> None:
    assert resp.command("HDEL", "kvbus:{i}:idx", "a", "clé", 7) == packed("HDEL", "kvbus:{i}:idx", "a", "clé", 7)


def arguments(encoded: bytes) -> list[str]:
    """The arguments of one encoded command (none of which holds a CRLF), checking the counts it declares."""
    head, *parts, tail = encoded.split(b"\r\n")
    assert tail == b"" and int(head[1:]) == len(parts) // 2
    assert all(int(size[1:]) == len(arg) for size, arg in zip(parts[::2], parts[1::2], strict=True))
    return [arg.decode() for arg in parts[1::2]]


@pytest.mark.parametrize(
    ("key", "names", "values"),
    [
        ("k", ["a" * 32, "b" * 32], [256, 256]),
        ("k", ["a" * 32, "b" * 32, "c" * 32, "d" * 32], [256, 7, 256, 1]),  # one length, values that differ
        ("k", ["a", "bb", "c" * 300], [1, 22, 1]),  # lengths that differ
        ("k", ["a", "b", "c", "d", "e", "f", "g", "h", "i"], list(range(9))),  # more values than are grouped
        ("clé", ["a", "b"], [1, 2]),  # a key that is not ASCII
        ("k", ["a", "bé", "c"], [1, 22, 1]),  # a field that is not
    ],
)
def test_hset_sets_each_field_to_its_value(key: str, names: list[str], values: list[int]) -> None:
    name, encoded_key, *fields = arguments(resp.hset(key, names, values))
    assert (name, encoded_key, len(fields)) == ("HSET", key, 2 * len(names))
    assert dict(zip(fields[::2], fields[1::2], strict=True)) == {n: str(v) for n, v in zip(names, values, strict=True)}


def test_hset_of_ascii_fields_of_one_value_is_what_redis_py_sends() -> None:
    names = [f"{n:032x}" for n in range(5)]
    fields = [arg for name in names for arg in (name, 256)]
    assert resp.hset("kvbus:{i}:idx", names, [256] * 5) == packed("HSET", "kvbus:{i}:idx", *fields)


@pytest.mark.parametrize(
    ("keys", "arg"),
    [(["x", "yy", "z" * 100], "0:inst"), (["x", "yé"], "0:inst"), (["x", "y"], "0:insté")],
)
def test_each_is_one_command_per_key(keys: list[str], arg: str) -> None:
    assert resp.each("SREM", keys, arg) == b"".join(packed("SREM", key, arg) for key in keys)


def test_what_it_encodes_redis_executes(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    connection = client.connection_pool.get_connection()
    try:
        connection.send_packed_command([resp.hset("h", ["a", "bé"], [1, 22]) + resp.each("SADD", ["s1", "s2"], "m")])
        assert [connection.read_response() for _ in range(3)] == [2, 1, 1]
    finally:
        client.connection_pool.release(connection)
    assert client.hgetall("h") == {"a": "1", "bé": "22"}
    assert client.smembers("s1") == client.smembers("s2") == {"m"}
    client.close()
