"""The OpenAI error envelope and the gateway's error codes.

Every non-2xx answer of /v1/* is ``{"error": {"message", "type", "param", "code"}}``
with all four keys present, as the official SDKs expect.
"""

from __future__ import annotations

import orjson

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
PERMISSION = "permission_error"
NOT_FOUND = "not_found_error"
RATE_LIMIT = "rate_limit_error"
SERVER = "server_error"


class GatewayError(Exception):
    """An error answered to the client with the OpenAI envelope.

    ``status`` is the HTTP status; ``type``/``code``/``param`` go into the body;
    ``headers`` are extra response headers (e.g. Retry-After).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        code: str | None = None,
        param: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or []

    def envelope(self) -> dict[str, dict[str, str | None]]:
        return error_envelope(self.message, type=self.type, code=self.code, param=self.param)

    def body(self) -> bytes:
        return orjson.dumps(self.envelope())


def error_envelope(
    message: str, *, type: str, code: str | None = None, param: str | None = None
) -> dict[str, dict[str, str | None]]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid_request(message: str, *, param: str | None = None, code: str = INVALID_REQUEST) -> GatewayError:
    """A 400 for a request that breaks the contract (seed 004: code ``invalid_request_error``)."""
    return GatewayError(400, message, type=INVALID_REQUEST, code=code, param=param)
