"""The admin: password rules, login throttling, security settings from the environment, static
files (issue 10, item 19). The same behind a real server and a TLS proxy: tests/live/test_live_admin.py.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from django.contrib.auth.forms import SetPasswordForm
from django.contrib.auth.hashers import PBKDF2PasswordHasher
from django.contrib.auth.models import User
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.test import Client

from tests.unit.test_settings import load_settings

STRONG = "plover-tangent-quarry-41"


class CountingHasher(PBKDF2PasswordHasher):
    """PBKDF2 that counts how often a password is hashed (checking one hashes it too)."""

    algorithm = "counting_pbkdf2"
    iterations = 1000
    hashed: ClassVar[int] = 0

    def encode(self, password: str, salt: str, iterations: int | None = None) -> str:
        CountingHasher.hashed += 1
        return super().encode(password, salt, iterations)


@pytest.fixture
def admin_user(settings: Any, db: None) -> User:
    settings.PASSWORD_HASHERS = ["tests.unit.test_admin_security.CountingHasher"]
    return User.objects.create_superuser("root", "root@example.com", STRONG)


def login(client: Client, username: str, password: str, ip: str = "192.0.2.1") -> Any:
    return client.post("/admin/login/?next=/admin/", {"username": username, "password": password}, REMOTE_ADDR=ip)


@pytest.mark.parametrize("password", ["a", "password123", "12345678901234", "root@example.com"])
def test_weak_passwords_are_refused(admin_user: User, password: str) -> None:
    with pytest.raises(ValidationError):
        validate_password(password, admin_user)
    form = SetPasswordForm(admin_user, {"new_password1": password, "new_password2": password})
    assert not form.is_valid()  # the admin's "change password" form


def test_a_strong_password_is_accepted(admin_user: User) -> None:
    validate_password(STRONG, admin_user)


def test_login_is_locked_after_failures_and_refused_before_hashing(admin_user: User, settings: Any) -> None:
    client = Client()
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        assert login(client, "root", "wrong").status_code == 200  # the form again, with an error
    hashed = CountingHasher.hashed
    assert login(client, "root", "wrong").status_code == 429  # the limit-th failure locks
    assert CountingHasher.hashed == hashed + 1
    # Locked: the right password, another username from the same address, the same username
    # from another address: all refused without hashing anything.
    assert login(client, "root", STRONG).status_code == 429
    assert login(client, "someone-else", "whatever").status_code == 429
    assert login(Client(), "root", STRONG, ip="198.51.100.20").status_code == 429
    assert CountingHasher.hashed == hashed + 1
    # Another address and username is not affected.
    User.objects.create_superuser("ops", "ops@example.com", STRONG)
    assert login(Client(), "ops", STRONG, ip="198.51.100.21").status_code == 302

    call_command("axes_reset", verbosity=0)  # what an operator runs to lift a lockout early
    assert login(client, "root", STRONG).status_code == 302


def test_a_success_resets_the_failure_count(admin_user: User, settings: Any) -> None:
    client = Client()
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        login(client, "root", "wrong")
    assert login(client, "root", STRONG).status_code == 302
    client.logout()
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        assert login(client, "root", "wrong").status_code == 200


def test_admin_static_files_are_served(client: Client) -> None:
    response = client.get("/static/admin/css/base.css")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/css")
    assert b"".join(response.streaming_content).strip()  # type: ignore[attr-defined]


def test_security_settings_have_safe_defaults(
    config_errors: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    for name in ("ALLOWED_HOSTS", "CSRF_TRUSTED_ORIGINS", "SECURE_PROXY_SSL_HEADER", "GATEWAY_HTTPS"):
        monkeypatch.delenv(name, raising=False)
    loaded = load_settings(monkeypatch, tmp_path)
    assert loaded["ALLOWED_HOSTS"] == ["localhost", "127.0.0.1", "[::1]"]
    assert loaded["CSRF_TRUSTED_ORIGINS"] == []
    assert loaded["SECURE_PROXY_SSL_HEADER"] is None
    assert (loaded["SESSION_COOKIE_SECURE"], loaded["CSRF_COOKIE_SECURE"], loaded["SECURE_HSTS_SECONDS"]) == (
        False,
        False,
        0,
    )
    assert loaded["AUTH_PASSWORD_VALIDATORS"]


def test_security_settings_come_from_the_environment(
    config_errors: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    loaded = load_settings(
        monkeypatch,
        tmp_path,
        ALLOWED_HOSTS="gw.example, admin.gw.example",
        CSRF_TRUSTED_ORIGINS="https://gw.example",
        SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto",
        GATEWAY_HTTPS="true",
        GATEWAY_ADMIN_LOGIN_FAILURES="3",
        GATEWAY_ADMIN_LOCKOUT_SECONDS="60",
    )
    assert loaded["ALLOWED_HOSTS"] == ["gw.example", "admin.gw.example"]
    assert loaded["CSRF_TRUSTED_ORIGINS"] == ["https://gw.example"]
    assert loaded["SECURE_PROXY_SSL_HEADER"] == ("HTTP_X_FORWARDED_PROTO", "https")
    assert (loaded["SESSION_COOKIE_SECURE"], loaded["CSRF_COOKIE_SECURE"]) == (True, True)
    assert loaded["SECURE_HSTS_SECONDS"] == 365 * 24 * 3600
    assert (loaded["AXES_FAILURE_LIMIT"], loaded["AXES_COOLOFF_TIME"].total_seconds()) == (3, 60)
    assert config_errors == []


def test_login_through_a_tls_proxy(admin_user: User, settings: Any) -> None:
    """The proxy says https in X-Forwarded-Proto: secure cookies, HSTS, and the CSRF origin check passes."""
    settings.ALLOWED_HOSTS = ["gw.example"]
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    settings.SESSION_COOKIE_SECURE = settings.CSRF_COOKIE_SECURE = True
    settings.SECURE_HSTS_SECONDS = 3600
    client = Client(enforce_csrf_checks=True, HTTP_HOST="gw.example", HTTP_X_FORWARDED_PROTO="https")
    page = client.get("/admin/login/")
    assert page.status_code == 200
    assert page["Strict-Transport-Security"] == "max-age=3600"
    assert page.cookies["csrftoken"]["secure"] is True
    token = page.cookies["csrftoken"].value
    done = client.post(
        "/admin/login/?next=/admin/",
        {"username": "root", "password": STRONG, "csrfmiddlewaretoken": token},
        HTTP_ORIGIN="https://gw.example",
    )
    assert done.status_code == 302, done.content[:300]
    assert done.cookies["sessionid"]["secure"] is True
    assert client.get("/admin/").status_code == 200
