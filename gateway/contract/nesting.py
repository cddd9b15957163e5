"""How deep a JSON document nests, measured on its bytes at C speed.

The gateway refuses request bodies nested more than :data:`MAX_NESTING` levels deep (in any
field, tools' schemas included): orjson parses up to 1024 levels but serializes only 254, so
a deeper body would pass validation and then fail when forwarded. Walking the parsed objects
in Python costs ~0.2 s for a 14 MiB body of 480,000 items; this scan of the raw bytes costs
~20 ms, all of it in ``bytes`` methods.

Contract: ``raw`` is valid JSON (call it after the parse succeeded); the body itself is
level 1.
"""

from __future__ import annotations

from gateway.contract.errors import invalid_request

# Far above what real tool schemas use; under orjson's serialization limit of 254.
MAX_NESTING = 64

_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b'"[]{}')))
_TO_PARENS = bytes.maketrans(b"[{]}", b"(())")


def nesting_exceeds(raw: bytes, limit: int = MAX_NESTING) -> bool:
    """Whether the valid JSON ``raw`` nests arrays and objects more than ``limit`` levels deep."""
    # Each level opens with a bracket: a body with no more brackets than the limit (strings'
    # brackets counted too) cannot exceed it. Most bodies stop here (0.29 µs for 204 bytes).
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    # Escapes only occur inside strings: drop escaped backslashes first (left to right, as
    # JSON reads them), then escaped quotes, so every quote left opens or closes a string.
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    # Keep quotes and brackets; what lies between a pair of quotes was a string's content.
    # Two adjacent quotes hold nothing between them: dropping them keeps every other quote's
    # parity and everything outside strings (usually no quote is left after this).
    text = text.translate(None, _NOT_STRUCTURE).replace(b'""', b"")
    if b'"' in text:
        text = b"".join(text.split(b'"')[::2])
    text = text.translate(_TO_PARENS)
    # Each pass removes the innermost level everywhere.
    for _ in range(limit):
        text = text.replace(b"()", b"")
        if not text:
            return False
    return True


def check_nesting(raw: bytes) -> None:
    """Refuse (400 ``nesting_too_deep``, param null) a valid JSON body nested past :data:`MAX_NESTING`."""
    if nesting_exceeds(raw):
        raise invalid_request(
            f"The request body is nested more than {MAX_NESTING} levels deep (arrays and objects).",
            code="nesting_too_deep",
        )
