"""System checks for the gateway's configuration, with stable ids.

Registered without ``deploy=True`` so they run for every command that checks
(runserver, migrate, serve, check). Ids are part of the interface: docs and
operators refer to them.

    gateway.E001  SECRET_KEY missing or shorter than 32 characters
    gateway.E002  GATEWAY_ENCRYPTION_KEY missing or not a Fernet key
    gateway.E003  DATABASE_URL malformed             (from gateway.conf.env)
    gateway.E004  REDIS_URL malformed                (from gateway.conf.env)
    gateway.E005  GATEWAY_UPSTREAM_TRANSPORT unknown
    gateway.E006  GATEWAY_SERVER unknown
    gateway.E007  GATEWAY_LOG_FORMAT unknown
    gateway.E008  GATEWAY_METRICS_TOKEN too short
    gateway.E010  a boolean variable is malformed    (from gateway.conf.env)
    gateway.E011  an integer variable is malformed   (from gateway.conf.env)
    gateway.E012  a number variable is malformed     (from gateway.conf.env)
    gateway.E013  a rate variable is malformed       (from gateway.conf.env)
    gateway.E020  OpenID Connect half-configured (some GATEWAY_OIDC_* set, a required one missing)
    gateway.W001  .env, the data directory or the SQLite database is open to other users

No message ever contains a secret value.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register
from django.core.exceptions import ImproperlyConfigured

from accounts.upstream.client import TRANSPORTS
from gateway.conf import env
from gateway.conf.files import readable_by_others

MIN_SECRET_KEY_LENGTH = 32
SERVERS = ("uvicorn", "daphne")
LOG_FORMATS = ("json", "text")
MIN_METRICS_TOKEN_LENGTH = 16

SECRET_KEY_HINT = (
    "Set SECRET_KEY to a long random string, e.g. the output of "
    '`python -c "import secrets; print(secrets.token_urlsafe(50))"` '
    "(or run `python manage.py genkeys`). Changing it later invalidates every tenant API key."
)
ENCRYPTION_KEY_HINT = (
    "Set GATEWAY_ENCRYPTION_KEY to a Fernet key: run `python manage.py genkeys`, or "
    '`python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"`. '
    "Upstream credentials stored under another key must be re-entered."
)
ENV_HINTS = {
    "gateway.E003": f"Set DATABASE_URL to {env.DATABASE_URL_FORMS} (percent-encode special characters "
    "of the password), or unset it to use the embedded SQLite database under GATEWAY_DATA_DIR.",
    "gateway.E004": "Set REDIS_URL to redis://host:6379/0 (or rediss://, unix://), "
    "or unset it to run a single process without Redis.",
    "gateway.E010": "Set the variable named above to true or false, or unset it to use the default.",
    "gateway.E011": "Set the variable named above to a whole number in range, or unset it to use the default.",
    "gateway.E012": "Set the variable named above to a number in range, or unset it to use the default.",
    "gateway.E013": "Set the variable named above to a rate such as 60/min, or unset it to use the default.",
}
DEFAULT_ENV_HINT = "Fix the environment variable named above, or unset it to use the default."


def _setting(name: str) -> Any:
    try:
        return getattr(settings, name, None)
    except ImproperlyConfigured:
        # Django refuses to hand out an empty SECRET_KEY; for us that is "missing".
        return None


@register()
def check_secret_key(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[CheckMessage]:
    value = _setting("SECRET_KEY")
    if not isinstance(value, str) or not value:
        return [
            Error("SECRET_KEY is not set: set it to a long random string.", hint=SECRET_KEY_HINT, id="gateway.E001")
        ]
    if len(value) < MIN_SECRET_KEY_LENGTH:
        return [
            Error(
                f"SECRET_KEY is too short ({len(value)} characters): set it to a long random string "
                f"of at least {MIN_SECRET_KEY_LENGTH} characters.",
                hint=SECRET_KEY_HINT,
                id="gateway.E001",
            )
        ]
    return []


@register()
def check_encryption_key(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[CheckMessage]:
    from accounts.crypto import is_valid_encryption_key

    value = _setting("GATEWAY_ENCRYPTION_KEY")
    if not isinstance(value, str) or not value:
        return [
            Error(
                "GATEWAY_ENCRYPTION_KEY is not set: upstream credentials cannot be encrypted.",
                hint=ENCRYPTION_KEY_HINT,
                id="gateway.E002",
            )
        ]
    if not is_valid_encryption_key(value):
        return [
            Error(
                "GATEWAY_ENCRYPTION_KEY is not a valid Fernet key (32 bytes, url-safe base64).",
                hint=ENCRYPTION_KEY_HINT,
                id="gateway.E002",
            )
        ]
    return []


@register()
def check_environment(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[CheckMessage]:
    """Report every value gateway.conf.env could not parse (collected at settings import)."""
    return [
        Error(message, hint=ENV_HINTS.get(check_id, DEFAULT_ENV_HINT), id=check_id)
        for check_id, message in env.CONFIG_ERRORS
    ]


@register()
def check_choices(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    transport = _setting("GATEWAY_UPSTREAM_TRANSPORT")
    if transport not in TRANSPORTS:
        errors.append(
            Error(
                f"GATEWAY_UPSTREAM_TRANSPORT={transport!r} is not supported.",
                hint=f"Set GATEWAY_UPSTREAM_TRANSPORT to one of {', '.join(TRANSPORTS)} "
                "(fast: the default, measured fastest), or unset it.",
                id="gateway.E005",
            )
        )
    server = _setting("GATEWAY_SERVER")
    if server not in SERVERS:
        errors.append(
            Error(
                f"GATEWAY_SERVER={server!r} is not supported.",
                hint="Set GATEWAY_SERVER to uvicorn (default, fastest) or daphne, or unset it.",
                id="gateway.E006",
            )
        )
    log_format = _setting("GATEWAY_LOG_FORMAT")
    if log_format not in LOG_FORMATS:
        errors.append(
            Error(
                f"GATEWAY_LOG_FORMAT={log_format!r} is not supported.",
                hint="Set GATEWAY_LOG_FORMAT to json (production) or text (development), or unset it.",
                id="gateway.E007",
            )
        )
    if _setting("GATEWAY_METRICS_TOKEN") and len(_setting("GATEWAY_METRICS_TOKEN")) < MIN_METRICS_TOKEN_LENGTH:
        errors.append(
            Error(
                f"GATEWAY_METRICS_TOKEN is shorter than {MIN_METRICS_TOKEN_LENGTH} characters.",
                hint="Set GATEWAY_METRICS_TOKEN to a long random string (e.g. `openssl rand -hex 24`), "
                "or unset it to serve /metrics to loopback clients only.",
                id="gateway.E008",
            )
        )
    return errors


@register()
def check_private_files(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[CheckMessage]:
    """Secrets and tenant data must not be readable by other local users (created private,
    gateway/conf/files.py; a path made before, or by hand, may not be)."""
    paths = [Path(settings.BASE_DIR) / ".env", Path(settings.DATA_DIR)]
    database = settings.DATABASES["default"]
    if database["ENGINE"] == env.SQLITE_ENGINE:
        paths.append(Path(database["NAME"]))
    return [
        Warning(
            f"{path} can be read by other users of this machine.",
            hint=f"Run `chmod {'700' if path.is_dir() else '600'} {path}`: it holds secrets or tenant data.",
            id="gateway.W001",
        )
        for path in paths
        if readable_by_others(path)
    ]


# What OpenID Connect sign-in needs once any GATEWAY_OIDC_* turns it on (tenancy/oidc.py).
OIDC_REQUIRED = (
    "GATEWAY_OIDC_ISSUER",
    "GATEWAY_OIDC_CLIENT_ID",
    "GATEWAY_OIDC_CLIENT_SECRET",
    "GATEWAY_OIDC_AUTHORIZATION_ENDPOINT",
    "GATEWAY_OIDC_TOKEN_ENDPOINT",
)
OIDC_SIGN_ALGOS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "HS256")


@register()
def check_oidc(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[CheckMessage]:
    """Single sign-on is all or nothing: a half-configured provider is an error, not silently off."""
    if not _setting("GATEWAY_OIDC_ENABLED"):
        return []
    problems = [f"{name} is not set" for name in OIDC_REQUIRED if not _setting(name)]
    algorithm = _setting("GATEWAY_OIDC_SIGN_ALGO")
    if algorithm not in OIDC_SIGN_ALGOS:
        problems.append(f"GATEWAY_OIDC_SIGN_ALGO={algorithm!r} is not one of {', '.join(OIDC_SIGN_ALGOS)}")
    elif algorithm != "HS256" and not _setting("GATEWAY_OIDC_JWKS_ENDPOINT"):
        problems.append(f"GATEWAY_OIDC_JWKS_ENDPOINT is not set (needed to check {algorithm} signatures)")
    if bool(_setting("GATEWAY_OIDC_OPERATOR_CLAIM")) != bool(_setting("GATEWAY_OIDC_OPERATOR_VALUE")):
        problems.append("GATEWAY_OIDC_OPERATOR_CLAIM and GATEWAY_OIDC_OPERATOR_VALUE go together")
    if not problems:
        return []
    return [
        Error(
            f"OpenID Connect sign-in is half-configured: {'; '.join(problems)}.",
            hint="Set every GATEWAY_OIDC_* variable that docs/configuration.md marks required, "
            "or unset them all to turn single sign-on off.",
            id="gateway.E020",
        )
    ]
