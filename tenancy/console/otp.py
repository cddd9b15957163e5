"""The console's TOTP second factor (django-otp): a user enrols from the security page with a
QR code (an inline SVG), and from then on signing in asks for a code after the password.

A user with a confirmed device is "pending" until they give a code in the session: every
console page sends them to the code prompt (common.console_view), whatever form they signed in
with. Wrong codes are throttled by django-otp (a growing delay per device).
"""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import urlencode

import qrcode
import qrcode.image.svg
from django.contrib.auth import get_user_model, login
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.safestring import SafeString, mark_safe
from django_otp import login as otp_login
from django_otp.plugins.otp_totp.models import TOTPDevice

from accounts.infra.audit import audit_change
from tenancy.console.common import confirm, console_view, done, has_confirmed_device
from tenancy.console.forms import TotpConfirmForm

# The session key of a user who gave the right password and still owes a code.
PENDING_USER = "console_otp_pending_user"
PENDING_BACKEND = "console_otp_pending_backend"
DEVICE_NAME = "console"


def start_pending(request: HttpRequest, user: Any, next_url: str) -> HttpResponse:
    """After the right password of a user with a device: remember them (not signed in yet)
    and ask for the code."""
    request.session.cycle_key()
    request.session[PENDING_USER] = user.pk
    request.session[PENDING_BACKEND] = getattr(user, "backend", "django.contrib.auth.backends.ModelBackend")
    query = f"?{urlencode({'next': next_url})}" if next_url else ""
    return redirect(f"/console/login/code/{query}")


def _safe_next(request: HttpRequest) -> str:
    wanted = request.POST.get("next") or request.GET.get("next") or ""
    if wanted and url_has_allowed_host_and_scheme(wanted, {request.get_host()}, require_https=request.is_secure()):
        return wanted
    return "/console/"


def login_code(request: HttpRequest) -> HttpResponse:
    """The second step of signing in: the code of the user's authenticator app."""
    if request.user.is_authenticated:
        user: Any = request.user
        if not has_confirmed_device(user) or user.is_verified():
            return redirect(_safe_next(request))
    else:
        pending = request.session.get(PENDING_USER)
        user = get_user_model().objects.filter(pk=pending, is_active=True).first() if pending else None
        if user is None:
            return redirect("console:login")
    form = TotpConfirmForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        device = _verified_device(user, form.cleaned_data["token"])
        if device is not None:
            if not request.user.is_authenticated:
                backend = request.session.pop(PENDING_BACKEND, None)
                request.session.pop(PENDING_USER, None)
                login(request, user, backend=backend)
            otp_login(request, device)
            return redirect(_safe_next(request))
        form.add_error("token", "That code is not right (or it expired): try the current one.")
    context = {"form": form, "next": _safe_next(request), "hide_nav": True}
    return render(request, "console/login_code.html", context, status=400 if form.errors else 200)


def _verified_device(user: Any, token: str) -> TOTPDevice | None:
    token = token.strip().replace(" ", "")
    for device in TOTPDevice.objects.filter(user=user, confirmed=True):
        if device.verify_token(token):  # throttled: refused for a while after a wrong code
            return device
    return None


def qr_svg(text: str) -> SafeString:
    """``text`` as an inline SVG QR code (path only: no style, no script)."""
    image = qrcode.make(text, image_factory=qrcode.image.svg.SvgPathImage)
    svg = image.to_string(encoding="unicode")
    return mark_safe(svg.replace("<svg ", '<svg role="img" aria-label="QR code of the TOTP secret" ', 1))


@console_view
def security(request: HttpRequest) -> HttpResponse:
    """Enrol a TOTP device (QR code, then a code to confirm it), or see that one is on."""
    user: Any = request.user
    if has_confirmed_device(user):
        return render(request, "console/security.html", {"enrolled": True})
    device = TOTPDevice.objects.filter(user=user, confirmed=False, name=DEVICE_NAME).first()
    if device is None:
        device = TOTPDevice.objects.create(user=user, name=DEVICE_NAME, confirmed=False)
    form = TotpConfirmForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        if device.verify_token(form.cleaned_data["token"].strip().replace(" ", "")):
            device.confirmed = True
            device.save(update_fields=["confirmed"])
            otp_login(request, device)
            _audit(request, "user.totp_enable")
            return done(request, "Two-factor sign-in is on: signing in now asks for a code.", "console:security")
        form.add_error("token", "That code is not right: check the device's clock and try the current one.")
    context = {
        "enrolled": False,
        "form": form,
        "qr": qr_svg(device.config_url),
        "secret": _base32(device),
    }
    return render(request, "console/security.html", context, status=400 if form.errors else 200)


@console_view
def security_disable(request: HttpRequest) -> HttpResponse:
    """Turn the second factor off: confirmed with a current code."""
    user: Any = request.user
    if not has_confirmed_device(user):
        return redirect("console:security")
    form = TotpConfirmForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        if _verified_device(user, form.cleaned_data["token"]) is not None:
            TOTPDevice.objects.filter(user=user).delete()
            _audit(request, "user.totp_disable")
            return done(request, "Two-factor sign-in is off.", "console:security")
        form.add_error("token", "That code is not right: try the current one.")
    return confirm(
        request,
        title="Turn off two-factor sign-in?",
        message="Signing in then asks for your password only. Give a current code to confirm.",
        button="Turn off",
        cancel_url="/console/security/",
        form=form,
    )


def _base32(device: TOTPDevice) -> str:
    return base64.b32encode(device.bin_key).decode().rstrip("=")


def _audit(request: HttpRequest, action: str) -> None:
    user: Any = request.user
    on = action.endswith("enable")
    audit_change(action, target=user, before={"totp": not on}, after={"totp": on}, label=user.get_username())
