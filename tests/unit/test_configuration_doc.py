"""docs/configuration.md lists exactly the environment variables the settings read (issue 9)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
READERS = {"env_str", "env_int", "env_float", "env_bool", "env_list", "env_rate", "redis_url"}


def variables_read() -> set[str]:
    """Names passed to the gateway.conf.env readers in the settings module (redis_url reads REDIS_URL)."""
    tree = ast.parse((ROOT / "gateway/conf/settings.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in READERS:
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                names.add(first.value)
            elif node.func.id == "redis_url":
                names.add("REDIS_URL")
    return names


def variables_documented() -> set[str]:
    names = set()
    for line in (ROOT / "docs/configuration.md").read_text().splitlines():
        if line.startswith("| `"):
            names.update(re.findall(r"`([A-Z][A-Z0-9_]+)`", line.split(" | ")[0]))
    return names


def test_every_variable_read_is_documented_and_every_documented_one_is_read() -> None:
    read, documented = variables_read(), variables_documented()
    assert len(read) > 30  # the walk found the settings' readers
    assert read - documented == set(), "read from the environment but not in docs/configuration.md"
    assert documented - read == set(), "in docs/configuration.md but not read from the environment"


def test_nothing_else_reads_the_environment_for_settings() -> None:
    """Settings come from gateway/conf/settings.py only (os.environ elsewhere is process plumbing)."""
    allowed = {
        "gateway/conf/env.py",
        "gateway/conf/asgi.py",
        "gateway/conf/celery.py",
        "gateway/metering/writer.py",
        # serve --workers N: hands the workers their shared metrics directory.
        "gateway/management/commands/serve.py",
        # --password-env: a secret handed to one command run, not a setting.
        "tenancy/management/commands/member_add.py",
    }
    for path in (p for room in ("gateway", "tenancy", "accounts") for p in (ROOT / room).rglob("*.py")):
        relative = str(path.relative_to(ROOT))
        if relative not in allowed:
            text = path.read_text()
            assert "os.environ" not in text, relative
            assert "os.getenv" not in text, relative
