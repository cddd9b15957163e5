"""Unit tests of gateway.contract.nesting: JSON nesting depth measured on the raw bytes."""

from __future__ import annotations

import json
import random
from typing import Any

import orjson
import pytest

from gateway.contract.nesting import MAX_NESTING, nesting_exceeds


def depth(value: Any) -> int:
    """The reference: levels of arrays and objects, the value itself being level 1."""
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


def nested(levels: int, leaf: Any = 1) -> Any:
    value = leaf
    for level in range(levels):
        value = [value] if level % 2 else {"k": value}
    return value


@pytest.mark.parametrize("levels", [1, 2, 63, 64])
def test_at_most_the_limit_passes(levels: int) -> None:
    assert not nesting_exceeds(orjson.dumps(nested(levels)))


@pytest.mark.parametrize("levels", [65, 100, 255, 1023])
def test_over_the_limit_is_found(levels: int) -> None:
    raw = (
        b'{"k": [' * (levels // 2) + b"1" + b"]}" * (levels // 2) if levels % 2 == 0 else b"[" * levels + b"]" * levels
    )
    orjson.loads(raw)  # valid JSON (orjson reads up to 1024 levels, writes up to 254)
    assert nesting_exceeds(raw)


def test_the_limit_is_under_what_orjson_can_serialize() -> None:
    assert MAX_NESTING < 254
    orjson.dumps(nested(MAX_NESTING))


def test_scalars_and_empty_containers() -> None:
    for doc in (b"1", b'"x"', b"null", b"[]", b"{}", b'"[[[["'):
        assert not nesting_exceeds(doc, 1)
    assert nesting_exceeds(b"[[]]", 1)


@pytest.mark.parametrize(
    "text",
    [
        "[[[[[[",  # brackets in a string are not nesting
        '\\"[[[[',  # an escaped quote does not end the string
        "\\\\",  # an escaped backslash before the closing quote
        '\\\\\\"{{{{',  # an escaped backslash then an escaped quote
        "a]]]]]]",
        "",
    ],
)
def test_strings_do_not_count(text: str) -> None:
    raw = json.dumps({"a": [text, {"b": text}], text: text}).encode()
    assert not nesting_exceeds(raw, 3)
    assert nesting_exceeds(raw, 2)


def test_agrees_with_the_reference_on_random_documents() -> None:
    rng = random.Random(10)
    pieces = ['"', "\\", "[", "]", "{", "}", "x", " "]

    def build(level: int) -> Any:
        kind = rng.random()
        if level > 8 or kind < 0.3:
            return "".join(rng.choice(pieces) for _ in range(rng.randrange(6)))
        if kind < 0.65:
            return [build(level + 1) for _ in range(rng.randrange(4))]
        return {build(9): build(level + 1) for _ in range(rng.randrange(4))}

    for _ in range(500):
        doc = build(0)
        raw = json.dumps(doc).encode()
        for limit in (1, 3, 6):
            assert nesting_exceeds(raw, limit) == (depth(doc) > limit), raw
