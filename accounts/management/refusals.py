"""How an operator command refuses input it cannot use: one line on stderr, a non-zero exit.

Services raise django.core.exceptions.ValidationError with human sentences (never a
credential): :func:`exit_on_refusal` shows them as a CommandError, without a traceback.
The ``*_or_exit`` lookups do the same for a name or id that matches nothing. The commands
of every room use them (tenancy's too: imports run down to accounts).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from django.core.exceptions import ValidationError
from django.core.management.base import CommandError

from accounts.infra.audit import Actor, acting_as
from accounts.models import Pool, UpstreamAccount


def _command_name() -> str:
    """The command being run (``manage.py NAME``), for the audit log."""
    argv = sys.argv
    if len(argv) > 1 and Path(argv[0]).name in ("manage.py", "django-admin"):
        return argv[1]
    return "command"


@contextmanager
def exit_on_refusal() -> Iterator[None]:
    """Run the block as the command's actor (the audit log records changes made inside it as
    made by the OS user through this command), and turn a ValidationError raised inside it
    into a one-line CommandError."""
    try:
        with acting_as(Actor.command(_command_name())):
            yield
    except ValidationError as exc:
        raise CommandError(" ".join(exc.messages)) from None


def whole_number_or_exit(value: object, what: str) -> int:
    """``value`` as an int; CommandError naming ``what`` (e.g. ``--weight``) otherwise."""
    try:
        return int(str(value))
    except ValueError:
        raise CommandError(f"{what} must be a whole number, got {value!r}.") from None


def pool_or_exit(name: str) -> Pool:
    """The pool called ``name``; CommandError if there is none."""
    pool = Pool.objects.filter(name=name).first()
    if pool is None:
        raise CommandError(f"unknown pool {name!r}: pools are created by `manage.py upstream_add`.")
    return pool


def account_or_exit(raw_id: object, what: str) -> UpstreamAccount:
    """The upstream account (with its pool) whose id is ``raw_id``; CommandError otherwise."""
    account_id = whole_number_or_exit(raw_id, what)
    account = UpstreamAccount.objects.select_related("pool").filter(pk=account_id).first()
    if account is None:
        raise CommandError(f"no upstream account {account_id}.")
    return account
