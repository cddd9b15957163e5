"""gateway.contract.upstream_errors: an upstream's error answer as the client sees it."""

from __future__ import annotations

import orjson
import pytest

from gateway.contract.upstream_errors import MAX_MESSAGE_CHARS, upstream_error_body

CREDENTIAL = "sk-upstream-credential-0123456789"


def envelope(raw: bytes) -> dict[str, object]:
    parsed = orjson.loads(raw)
    assert set(parsed) == {"error"}
    assert set(parsed["error"]) == {"message", "type", "param", "code"}
    return parsed["error"]


def test_a_valid_envelope_keeps_its_four_fields_and_nothing_else() -> None:
    content = orjson.dumps(
        {
            "error": {
                "message": "Invalid value for 'temperature'.",
                "type": "invalid_request_error",
                "param": "temperature",
                "code": "invalid_value",
                "internal_trace": "abc",
            },
            "debug": {"host": "10.0.0.7"},
        }
    )
    assert envelope(upstream_error_body(400, content)) == {
        "message": "Invalid value for 'temperature'.",
        "type": "invalid_request_error",
        "param": "temperature",
        "code": "invalid_value",
    }


@pytest.mark.parametrize(
    "content",
    [
        b"<html><body><h1>400 Bad Request</h1></body></html>",
        b"",
        b"[1, 2, 3]",
        b'{"error": "just a string"}',
        b'{"error": {"code": "no_message"}}',
        b'{"detail": "Not Found"}',
    ],
)
def test_anything_else_becomes_a_generic_envelope_naming_the_status(content: bytes) -> None:
    assert envelope(upstream_error_body(404, content)) == {
        "message": "The upstream rejected the request (HTTP 404).",
        "type": "invalid_request_error",
        "param": None,
        "code": "upstream_rejected",
    }


def test_the_credential_is_redacted_from_every_field() -> None:
    content = orjson.dumps(
        {
            "error": {
                "message": f"Bad request; you sent Authorization: Bearer {CREDENTIAL}",
                "type": f"t-{CREDENTIAL}",
                "param": CREDENTIAL,
                "code": f"{CREDENTIAL}{CREDENTIAL}",
            }
        }
    )
    raw = upstream_error_body(400, content, (CREDENTIAL, None))
    assert CREDENTIAL.encode() not in raw
    error = envelope(raw)
    assert error["message"] == "Bad request; you sent Authorization: Bearer [redacted]"
    assert error["param"] == "[redacted]"
    assert error["code"] == "[redacted][redacted]"


def test_non_string_fields_are_normalised_and_long_messages_cut() -> None:
    content = orjson.dumps({"error": {"message": "x" * (MAX_MESSAGE_CHARS + 100), "type": 7, "param": 1, "code": []}})
    error = envelope(upstream_error_body(422, content))
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (None, None)
    assert isinstance(error["message"], str)
    assert len(error["message"]) == MAX_MESSAGE_CHARS + 3


def test_short_secrets_are_not_looked_for() -> None:
    content = orjson.dumps({"error": {"message": "a bad key", "type": "invalid_request_error"}})
    assert envelope(upstream_error_body(400, content, ("a",)))["message"] == "a bad key"
