"""What a client sees of an upstream's error answer: always the OpenAI envelope, never a secret.

An upstream 4xx that is the request's own fault (a parameter the upstream refuses, a
context too long) is relayed to the client with its status, because the client can fix
it. Its body is not relayed as it came: upstreams (and the proxies in front of them) answer
HTML pages, empty bodies, or echo the request's headers, the account's credential among
them. :func:`upstream_error_body` rebuilds the answer:

- a valid envelope (``{"error": {"message": str, ...}}``) keeps its ``message``, ``type``,
  ``param`` and ``code`` (strings, or null for ``param``/``code``), nothing else;
- anything else becomes a generic envelope naming the upstream's status;
- every string has each of ``secrets`` (the account's credential) replaced by
  ``[redacted]``, and the message is cut at ``MAX_MESSAGE_CHARS``.

Contract: never raises, always returns one JSON object (bytes) in the seed's envelope shape.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from gateway.contract.errors import INVALID_REQUEST as INVALID

MAX_MESSAGE_CHARS = 4096
REDACTED = "[redacted]"
# A secret shorter than this is not looked for: it would redact ordinary words.
MIN_SECRET_CHARS = 8


def upstream_error_body(status: int, content: bytes, secrets: Iterable[str | None] = ()) -> bytes:
    """The envelope to relay for an upstream's ``status`` answer with body ``content``."""
    hidden = sorted({s for s in secrets if s and len(s) >= MIN_SECRET_CHARS}, key=len, reverse=True)
    error = _envelope_error(content)
    if error is None:
        error = {
            "message": f"The upstream rejected the request (HTTP {status}).",
            "type": INVALID,
            "param": None,
            "code": "upstream_rejected",
        }

    def clean(value: str) -> str:
        for secret in hidden:
            value = value.replace(secret, REDACTED)
        return value

    message = clean(error["message"])
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "..."
    return orjson.dumps(
        {
            "error": {
                "message": message,
                "type": clean(error["type"]),
                "param": None if error["param"] is None else clean(error["param"]),
                "code": None if error["code"] is None else clean(error["code"]),
            }
        }
    )


def _envelope_error(content: bytes) -> dict[str, Any] | None:
    """The fields of a valid OpenAI error envelope in ``content``; None when it is not one."""
    try:
        parsed = orjson.loads(content)
    except orjson.JSONDecodeError:
        return None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return None
    type_ = error.get("type")
    param, code = error.get("param"), error.get("code")
    return {
        "message": error["message"],
        "type": type_ if isinstance(type_, str) and type_ else INVALID,
        "param": param if isinstance(param, str) else None,
        "code": code if isinstance(code, str) else None,
    }
