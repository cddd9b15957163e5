"""The real Codex CLI (npm ``@openai/codex``) through a live gateway, configured as its users do.

``.ci/run`` installs the pinned CLI under ``var/npm`` (``CODEX_BIN`` points elsewhere). Two
set-ups: a custom provider with ``supports_websockets = true`` (Codex opens a WebSocket to
``/v1/responses``), and the gateway as Codex's built-in OpenAI provider (``openai_base_url``),
which also turns on remote compaction. The fake upstream calls Codex's first tool on the first
turn, so every ``codex exec`` here is a multi-turn exchange with a tool call.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MODEL, Live

pytestmark = pytest.mark.live

ROOT = Path(__file__).resolve().parents[2]
CODEX = Path(os.environ.get("CODEX_BIN") or ROOT / "var" / "npm" / "node_modules" / ".bin" / "codex")
needs_codex = pytest.mark.skipif(
    not CODEX.exists(), reason=f"the Codex CLI is not installed at {CODEX} (.ci/run installs it; or set CODEX_BIN)"
)
# What Codex prints when a WebSocket fails: none of it may appear.
FAILURE_MARKERS = ("Reconnecting", "Falling back", "stream disconnected", "ERROR")


def run_codex(tmp_path: Path, config: str, env: dict[str, str], prompt: str = "say hi") -> str:
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(config)
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run(
        [str(CODEX), "exec", "--skip-git-repo-check", "-s", "danger-full-access", prompt],
        cwd=work,
        env={**os.environ, "CODEX_HOME": str(home), "RUST_LOG": "codex_api=info", **env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return output


def ws_requests(live_gw: Live) -> list[dict[str, Any]]:
    """The upstream requests that arrived from a Codex WebSocket (Codex marks them in client_metadata)."""
    return [
        request
        for request in live_gw.upstream.requests()
        if "x-codex-ws-stream-request-start-ms" in (request["body"].get("client_metadata") or {})
    ]


@needs_codex
def test_codex_exec_with_a_tool_call_over_a_websocket(live_gw: Live, tmp_path: Path) -> None:
    from tenancy.models import UsageRecord

    live_gw.upstream.reset()
    config = f"""
model = "{MODEL}"
model_provider = "gateway"

[model_providers.gateway]
name = "gateway"
base_url = "{live_gw.url}/v1"
env_key = "GATEWAY_KEY"
wire_api = "responses"
supports_websockets = true
"""
    output = run_codex(tmp_path, config, {"GATEWAY_KEY": live_gw.owner.key})
    assert "successfully connected to Responses WebSocket" in output
    for marker in FAILURE_MARKERS:
        assert marker not in output, output[-3000:]
    assert "The tool said:" in output  # the second turn saw the tool's output
    inputs = [request["body"]["input"] for request in ws_requests(live_gw)]
    assert any(items[-1]["type"] == "function_call_output" for items in inputs), "no tool turn over the socket"
    live_gw.drain_usage()
    records = UsageRecord.objects.filter(api_key_id=live_gw.owner.api_key.id, status_code=200, stream=True)
    assert records.count() >= 2


@needs_codex
def test_codex_remote_compaction_round_trip(live_gw: Live, tmp_path: Path) -> None:
    live_gw.upstream.reset()
    # The gateway as Codex's own OpenAI provider: WebSockets and remote compaction on. The
    # limit is below the first turn's context, so Codex compacts in the middle of the turn.
    config = f"""
model = "{MODEL}"
model_provider = "openai"
openai_base_url = "{live_gw.url}/v1"
model_auto_compact_token_limit = 5000
"""
    output = run_codex(tmp_path, config, {"CODEX_API_KEY": live_gw.owner.key})
    assert "context compacted" in output
    assert "Continuing from the compacted context." in output
    for marker in FAILURE_MARKERS:
        assert marker not in output, output[-3000:]
    requests = [request["body"] for request in ws_requests(live_gw)]
    triggers = [i for i, body in enumerate(requests) if body["input"][-1] == {"type": "compaction_trigger"}]
    assert triggers, "Codex sent no compaction request"
    # The compaction item the upstream made came back to it unchanged on the next turn.
    compacted = [
        item for body in requests[triggers[0] + 1 :] for item in body["input"] if item.get("type") == "compaction"
    ]
    assert compacted, "the compacted context never came back"
    # The fake seals {"compacted": ...} in base64: it decodes, so no byte of it was changed.
    assert "compacted" in json.loads(base64.b64decode(compacted[0]["encrypted_content"], validate=True))
