"""How deep a JSON body nests, measured on its bytes before any parser recurses into it.

JSON parsers recurse per level and run out of stack on bodies a few thousand levels deep; the
controller and the engine refuse a body past their limit with a 400 before parsing it.
"""

from __future__ import annotations

import itertools

_STEPS = bytes.maketrans(b"[]{}", b"\x01\xff\x01\xff")  # +1 and -1 as signed bytes
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))


def deeper_than(body: bytes, limit: int) -> int | None:
    """The body's nesting depth if it is over `limit`, else None.

    Brackets inside strings do not count. Escaped backslashes go first, then escaped quotes (in that
    order `\\\\\\"` is a backslash and a quote), so every quote left opens or closes a string and the
    even pieces between quotes are outside strings. Each step is one C loop over the body (about
    0.1 s for the worst 4 MiB body), and a body with too few brackets to be that deep anywhere
    skips them all, so the body size limit bounds the cost.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return None
    unescaped = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"".join(unescaped.split(b'"')[::2])
    steps = memoryview(outside.translate(_STEPS, _NOT_BRACKETS)).cast("b")
    depth = max(itertools.accumulate(steps), default=0)
    return depth if depth > limit else None
