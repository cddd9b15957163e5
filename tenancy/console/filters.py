"""The console's filter forms (GET): the request log, the audit log, usage and the overview.

Every value of the query string is read by a form field, so bad input (an unreadable or
out-of-range date, a NUL character, an unknown order, a damaged page cursor or one made for
another order, a non-numeric id) is an error shown next to its field with a 400, never a 500
(tenancy.params and tenancy.keyset read the values).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django import forms
from django.core.exceptions import ValidationError

from tenancy.keyset import SortKey, cursor_parse, order_parse
from tenancy.params import id_parse, moment_parse
from tenancy.selectors import AUDIT_SORTS, USAGE_SORTS


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


def _text(max_length: int = 200) -> forms.CharField:
    # Django's CharField refuses NUL characters (ProhibitNullCharactersValidator).
    return forms.CharField(required=False, max_length=max_length)


class SortedLogFilter(forms.Form):
    """A log's order and keyset cursor: ``?sort=`` (one of the log's orders, ``-`` for
    descending; absent: newest first) and ``?after=`` (the next page) or ``?before=`` (the page
    before), each a cursor made for that order (tenancy.keyset). An unknown order, a damaged
    cursor or one made for another order is an error next to its field.

    ``cleaned_data``: ``order`` (an Order), ``after`` and ``before`` (a Position or None)."""

    sorts: dict[str, SortKey] = {}
    default_order = "-time"

    tenant = _text(100)
    sort = _text(20)
    after = _text(300)
    before = _text(300)

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        try:
            order = order_parse(data.get("sort") or self.default_order, self.sorts)
        except ValueError as error:
            self.add_error("sort", str(error))
            return data
        data["order"] = order
        for name in ("after", "before"):
            text = data.get(name)
            if not text:
                data[name] = None
                continue
            try:
                data[name] = cursor_parse(text, order)
            except ValueError as error:
                self.add_error(name, str(error))
        if data.get("after") and data.get("before"):
            self.add_error("before", "not with After: one page at a time.")
        return data


class RequestLogFilter(SortedLogFilter):
    sorts = USAGE_SORTS
    request_id = _text()
    key = IdField(required=False)
    account = IdField(required=False)
    status = forms.IntegerField(required=False, min_value=100, max_value=599)
    model = _text()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["from"] = MomentField(required=False)
        self.fields["to"] = MomentField(required=False)

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        start, end = data.get("from"), data.get("to")
        if start is not None and end is not None and end <= start:
            self.add_error("to", "must be after From.")
        return data


class AuditFilter(SortedLogFilter):
    sorts = AUDIT_SORTS
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
