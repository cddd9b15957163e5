"""The console's filter forms (GET): the request log, the audit log, usage and the overview.

Every value of the query string is read by a form field, so bad input (an unreadable or
out-of-range date, a NUL character, a damaged page cursor, a non-numeric id) is an error shown
next to its field with a 400, never a 500 (tenancy.params reads the values).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django import forms
from django.core.exceptions import ValidationError

from tenancy.params import cursor_parse, id_parse, moment_parse


class MomentField(forms.CharField):
    """A date (UTC midnight) or an ISO datetime (no offset: UTC)."""

    def to_python(self, value: Any) -> datetime | None:  # type: ignore[override]
        text = super().to_python(value)
        if not text:
            return None
        try:
            return moment_parse(text)
        except ValueError as error:
            raise ValidationError(str(error)) from None


class IdField(forms.CharField):
    """A database id (1 to 2**63 - 1)."""

    def to_python(self, value: Any) -> int | None:  # type: ignore[override]
        text = super().to_python(value)
        if not text:
            return None
        try:
            return id_parse(text)
        except ValueError as error:
            raise ValidationError(str(error)) from None


class CursorField(forms.CharField):
    """The keyset cursor of a newest-first log (``<ISO time>,<id>``)."""

    def to_python(self, value: Any) -> tuple[datetime, int] | None:  # type: ignore[override]
        text = super().to_python(value)
        if not text:
            return None
        try:
            return cursor_parse(text)
        except ValueError as error:
            raise ValidationError(str(error)) from None


def _text(max_length: int = 200) -> forms.CharField:
    # Django's CharField refuses NUL characters (ProhibitNullCharactersValidator).
    return forms.CharField(required=False, max_length=max_length)


class TimedFilter(forms.Form):
    """A range ``[from, to)`` and the keyset cursor of a newest-first log."""

    tenant = _text(100)
    before = CursorField(required=False)

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        start, end = data.get("from"), data.get("to")
        if start is not None and end is not None and end <= start:
            self.add_error("to", "must be after From.")
        return data


class RequestLogFilter(TimedFilter):
    request_id = _text()
    key = IdField(required=False)
    account = IdField(required=False)
    status = forms.IntegerField(required=False, min_value=100, max_value=599)
    model = _text()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["from"] = MomentField(required=False)
        self.fields["to"] = MomentField(required=False)


class AuditFilter(TimedFilter):
    action = _text(100)


class OverviewFilter(forms.Form):
    tenant = _text(100)
    range = forms.CharField(required=False, max_length=8)


class UsageFilter(forms.Form):
    tenant = _text(100)
    range = forms.CharField(required=False, max_length=8)
    group_by = forms.MultipleChoiceField(
        required=False, choices=[(name, name) for name in ("tenant", "key", "model", "account")]
    )
    format = forms.ChoiceField(required=False, choices=[("", "page"), ("csv", "CSV")])
