"""The nesting depth of a JSON body, read from its bytes: brackets in strings and escapes do not count."""

from __future__ import annotations

import json

import pytest

from kvbus.shared.json_depth import deeper_than


@pytest.mark.parametrize("depth", [1, 5, 64, 65, 3000])
def test_depth_is_measured_only_past_the_limit(depth: int) -> None:
    body = ("[" * depth + "]" * depth).encode()
    assert deeper_than(body, 64) == (depth if depth > 64 else None)


def test_brackets_inside_strings_and_escaped_quotes_do_not_count() -> None:
    inner = "[" * 100 + '\\"' + "{" * 100
    body = json.dumps({"prompt": inner, "tokens": [[1]]}).encode()
    assert deeper_than(body, 3) is None  # the object and two lists
    assert deeper_than(body, 2) == 3
