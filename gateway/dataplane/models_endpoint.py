"""``GET /v1/models`` and ``GET /v1/models/{id}``: the models a key may call."""

from __future__ import annotations

import orjson

from gateway.dataplane.asgi_io import Scope, Send, send_json
from gateway.dataplane.auth import authenticate, model_not_found
from gateway.dataplane.exchange import Exchange
from gateway.dataplane.runtime import Runtime


async def models(scope: Scope, send: Send, runtime: Runtime, ex: Exchange, model_id: str) -> None:
    await runtime.fresh_token()
    snapshot = await runtime.config.current()
    key = await authenticate(scope, runtime.config.keys)
    visible = [
        {"id": model, "object": "model", "created": entry.created, "owned_by": entry.owned_by}
        for model, entry in sorted(snapshot.models.items())
        if key.allowed_models is None or model in key.allowed_models
    ]
    if not model_id:
        await send_json(send, 200, orjson.dumps({"object": "list", "data": visible}), ex.rid)
        return
    for entry in visible:
        if entry["id"] == model_id:
            await send_json(send, 200, orjson.dumps(entry), ex.rid)
            return
    raise model_not_found(model_id)
