"""docs/api.md is true: every ``sh`` block in it runs, in order, as one bash script against a
live gateway (real curl over real sockets, the documented ``manage.py`` commands against the
test database). ``set -euo pipefail`` and curl's ``--fail-with-body`` make any failed step fail
the test; the blocks' own ``test`` lines check what the reader is told to expect.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import harness as live

pytestmark = pytest.mark.live

DOC = live.ROOT / "docs" / "api.md"
BLOCK = re.compile(r"^```sh\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def doc_script() -> str:
    blocks = BLOCK.findall(DOC.read_text())
    assert len(blocks) >= 5, "docs/api.md lost its walk-through"
    return "\n".join(blocks)


def test_every_command_in_the_doc_is_in_a_tested_block() -> None:
    """No curl or manage.py line outside the ``sh`` blocks this test runs."""
    text = DOC.read_text()
    untested = BLOCK.sub("", text)
    for fence in re.findall(r"^```\w*\n(.*?)^```$", untested, re.DOTALL | re.MULTILINE):
        assert "curl " not in fence, fence
        assert "manage.py " not in fence, fence


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("jq") is None, reason="needs curl and jq")
def test_the_documented_walk_through_runs_against_a_live_gateway(
    transactional_db: None, live_env: dict[str, str], start_gateway: Callable[..., live.LiveProcess], tmp_path: Path
) -> None:
    gateway = start_gateway()
    script = tmp_path / "api-doc.sh"
    # The doc says `.venv/bin/python`; the test runs the interpreter running the tests.
    script.write_text("set -euo pipefail\n" + doc_script().replace(".venv/bin/python", sys.executable))
    result = subprocess.run(
        ["bash", str(script)],
        cwd=live.ROOT,
        env={**live_env, "GW": gateway.url, "FAKE_PORT": str(live.free_port())},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
