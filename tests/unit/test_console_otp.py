"""The console's TOTP second factor (issue 13): a user enrols from the security page with an
inline SVG QR code, and from then on signing in asks for a code after the password."""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.cache import cache
from django.test import Client
from django_otp.oath import TOTP
from django_otp.plugins.otp_totp.models import TOTPDevice

from tenancy.models import AuditEntry

pytestmark = pytest.mark.django_db

PASSWORD = "correct horse battery staple"


@pytest.fixture(autouse=True)
def _clear(settings: Any) -> None:
    cache.clear()
    # No delay after a wrong code in these tests (test_a_wrong_code_delays_the_next_try keeps it).
    settings.OTP_TOTP_THROTTLE_FACTOR = 0


def code(device: TOTPDevice, steps_ahead: int = 0) -> str:
    """The code the user's app shows now (or ``steps_ahead`` steps later: a code is used once)."""
    totp = TOTP(device.bin_key, device.step, device.t0, device.digits, device.drift)
    totp.time = time.time() + steps_ahead * device.step
    return f"{totp.token():0{device.digits}d}"


def enrolled(client: Client, username: str) -> TOTPDevice:
    page = client.get("/console/security/")
    assert page.status_code == 200
    html = page.content.decode()
    assert '<svg role="img" aria-label="QR code of the TOTP secret"' in html
    device = TOTPDevice.objects.get(user__username=username, confirmed=False)
    assert (
        client.post("/console/security/", {"token": "000000" if code(device) != "000000" else "111111"}).status_code
        == 400
    )
    assert client.post("/console/security/", {"token": code(device)}).status_code == 302
    device.refresh_from_db()
    assert device.confirmed
    return device


def test_a_user_enrols_and_then_signing_in_asks_for_the_code() -> None:
    User.objects.create_user("tina", password=PASSWORD)
    client = Client()
    client.post("/console/login/", {"username": "tina", "password": PASSWORD})
    assert "off" in client.get("/console/security/").content.decode()
    device = enrolled(client, "tina")
    assert "Signing in asks for a code" in client.get("/console/security/").content.decode()
    assert AuditEntry.objects.filter(action="user.totp_enable", actor_label="tina").exists()
    client.post("/console/logout/")

    # the right password alone signs nobody in
    step = client.post("/console/login/", {"username": "tina", "password": PASSWORD, "next": "/console/tenants/"})
    assert step.status_code == 302
    assert step["Location"] == "/console/login/code/?next=%2Fconsole%2Ftenants%2F"
    assert client.get("/console/").status_code == 302
    assert client.get("/console/")["Location"].startswith("/console/login/")
    wrong = client.post("/console/login/code/", {"token": "12345", "next": "/console/tenants/"})
    assert wrong.status_code == 400
    assert 'id="id_token_errors"' in wrong.content.decode()
    signed = client.post("/console/login/code/", {"token": code(device, steps_ahead=1), "next": "/console/tenants/"})
    assert signed.status_code == 302
    assert signed["Location"] == "/console/tenants/"
    assert client.get("/console/").status_code == 200


def test_a_code_prompt_without_a_password_step_goes_back_to_the_login_page() -> None:
    assert Client().get("/console/login/code/")["Location"] == "/console/login/"


def test_a_session_signed_in_elsewhere_still_owes_the_code() -> None:
    user = User.objects.create_user("tina", password=PASSWORD)
    TOTPDevice.objects.create(user=user, name="console", confirmed=True)
    client = Client()
    client.force_login(user)  # e.g. through the admin's sign-in form
    response = client.get("/console/tenants/")
    assert response.status_code == 302
    assert response["Location"] == "/console/login/code/"
    device = TOTPDevice.objects.get(user=user)
    assert client.post("/console/login/code/", {"token": code(device)}).status_code == 302
    assert client.get("/console/tenants/").status_code == 200


def test_turning_the_second_factor_off_takes_a_current_code() -> None:
    User.objects.create_user("tina", password=PASSWORD)
    client = Client()
    client.post("/console/login/", {"username": "tina", "password": PASSWORD})
    device = enrolled(client, "tina")
    assert client.get("/console/security/disable/").status_code == 200
    assert client.post("/console/security/disable/", {"token": "000000"}).status_code == 200
    assert TOTPDevice.objects.filter(user__username="tina").exists()
    assert client.post("/console/security/disable/", {"token": code(device, steps_ahead=1)}).status_code == 302
    assert not TOTPDevice.objects.filter(user__username="tina").exists()
    client.post("/console/logout/")
    assert client.post("/console/login/", {"username": "tina", "password": PASSWORD})["Location"] == "/console/"


def test_a_wrong_code_delays_the_next_try(settings: Any) -> None:
    settings.OTP_TOTP_THROTTLE_FACTOR = 60  # seconds after the first wrong code, doubling
    user = User.objects.create_user("tina", password=PASSWORD)
    device = TOTPDevice.objects.create(user=user, name="console", confirmed=True)
    client = Client()
    client.post("/console/login/", {"username": "tina", "password": PASSWORD})
    assert (
        client.post("/console/login/code/", {"token": "000000" if code(device) != "000000" else "111111"}).status_code
        == 400
    )
    assert client.post("/console/login/code/", {"token": code(device)}).status_code == 400
    assert client.get("/console/").status_code == 302
