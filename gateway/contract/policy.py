"""A key's request policy beyond models: reasoning efforts, tools, client IPs, output cap.

Applied once per request, after validation and before admission (gateway/dataplane/responses.py).
Refusals are 403 with the OpenAI envelope; the output cap clamps instead of refusing.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from gateway.config.snapshot import KeyInfo
from gateway.contract.errors import INVALID_REQUEST, PERMISSION, GatewayError


def apply_policy(request: dict[str, Any], key: KeyInfo, client_ip: str | None) -> dict[str, Any]:
    """Check ``request`` against the key's policy; return it with ``max_output_tokens`` clamped.

    The clamp matters where the pool forwards the field; everywhere it bounds the
    budget reservation (see gateway/dataplane/responses.py).
    """
    if key.allowed_ips is not None:
        _check_ip(key, client_ip)
    if key.reasoning_efforts is not None:
        reasoning = request.get("reasoning")
        effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
        if effort is not None and str(effort).lower() not in key.reasoning_efforts:
            allowed = ", ".join(sorted(key.reasoning_efforts)) or "none"
            raise GatewayError(
                403,
                f"This API key may not use reasoning effort '{effort}' (allowed: {allowed}).",
                type=INVALID_REQUEST,
                code="reasoning_effort_not_allowed",
                param="reasoning.effort",
            )
    if key.allowed_tools is not None:
        for index, tool in enumerate(request.get("tools") or ()):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind is not None and str(kind).lower() not in key.allowed_tools:
                raise GatewayError(
                    403,
                    f"This API key may not use tools of type '{kind}'.",
                    type=INVALID_REQUEST,
                    code="tool_not_allowed",
                    param=f"tools[{index}].type",
                )
    cap = key.max_output_tokens
    if cap is not None:
        asked = request.get("max_output_tokens")
        if asked is None or asked > cap:
            request = {**request, "max_output_tokens": cap}
    return request


def _check_ip(key: KeyInfo, client_ip: str | None) -> None:
    try:
        address = ipaddress.ip_address(client_ip) if client_ip else None
    except ValueError:
        address = None
    if address is None or not any(address in network for network in key.allowed_ips or ()):
        raise GatewayError(
            403,
            "This API key may not be used from this IP address.",
            type=PERMISSION,
            code="ip_not_allowed",
        )
