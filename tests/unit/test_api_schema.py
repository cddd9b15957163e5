"""The management API's OpenAPI schema stays clean: valid OpenAPI 3 and no generator warning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from django.core.management import call_command
from rest_framework.test import APIClient


def test_spectacular_validates_the_schema_with_warnings_as_errors(tmp_path: Path) -> None:
    out = tmp_path / "schema.json"
    # --fail-on-warn exits non-zero (SystemExit) on any warning or error of the generator.
    call_command("spectacular", "--validate", "--fail-on-warn", "--format", "openapi-json", "--file", str(out))
    schema = json.loads(out.read_text())
    assert schema["openapi"].startswith("3.")
    assert "/api/v1/me" in schema["paths"]
    assert schema["components"]["securitySchemes"]["accessToken"]["scheme"] == "bearer"


@pytest.mark.django_db
def test_the_schema_is_served_as_json() -> None:
    response = APIClient().get("/api/schema/?format=json")
    assert response.status_code == 200
    assert response.json()["info"]["title"] == "Responses Gateway management API"
