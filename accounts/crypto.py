"""Encryption at rest for upstream credentials (Fernet under GATEWAY_ENCRYPTION_KEY).

Contract: no function here ever puts a key, a plaintext or a token into an exception
message or a log line. Errors say *what* is wrong, never the value.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


class CredentialDecryptError(Exception):
    """A stored credential cannot be decrypted with the configured key."""


# (GATEWAY_ENCRYPTION_KEY the Fernet was built from, Fernet). Rebuilt only when the
# setting changes (tests with override_settings).
_fernet_cache: tuple[str, Fernet] | None = None


def generate_encryption_key() -> str:
    """A new random key suitable for GATEWAY_ENCRYPTION_KEY (url-safe base64 of 32 bytes)."""
    return Fernet.generate_key().decode("ascii")


def is_valid_encryption_key(key: str) -> bool:
    """True if ``key`` is a usable Fernet key."""
    try:
        Fernet(key.encode("ascii"))
    except (ValueError, UnicodeEncodeError):  # binascii.Error is a ValueError
        return False
    return True


def _fernet() -> Fernet:
    global _fernet_cache
    key: str = getattr(settings, "GATEWAY_ENCRYPTION_KEY", "") or ""
    cached = _fernet_cache
    if cached is not None and cached[0] is key:
        return cached[1]
    if not key:
        raise ImproperlyConfigured("GATEWAY_ENCRYPTION_KEY is not set; generate one with `python manage.py genkeys`.")
    try:
        fernet = Fernet(key.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        # `from None`: the original exception may carry the key bytes.
        raise ImproperlyConfigured(
            "GATEWAY_ENCRYPTION_KEY is not a valid Fernet key (32 bytes, url-safe base64)."
        ) from None
    _fernet_cache = (key, fernet)
    return fernet


def encrypt_credential(plain: str) -> str:
    """Encrypt ``plain`` to a Fernet token (ASCII str). Raises ImproperlyConfigured without a valid key."""
    return _fernet().encrypt(plain.encode("utf-8")).decode("ascii")


def decrypt_credential(token: str) -> str:
    """Decrypt a token made by :func:`encrypt_credential`.

    Raises CredentialDecryptError when the token was made under another key or is
    corrupt, ImproperlyConfigured without a valid key.
    """
    try:
        return _fernet().decrypt(token.encode("ascii")).decode("utf-8")
    except (InvalidToken, UnicodeError):
        raise CredentialDecryptError(
            "a stored upstream credential cannot be decrypted with the current GATEWAY_ENCRYPTION_KEY"
        ) from None
