"""Helpers of the console's unit tests."""

from __future__ import annotations

from django.contrib.auth.models import User
from django.test import Client

from tenancy.models import Role, Tenant
from tenancy.services.members import member_add
from tenancy.services.tenants import tenant_create


def signed_in_client(username: str, password: str) -> Client:
    """Django's test client signed in as ``username`` through the console's login form."""
    client = Client()
    assert client.post("/console/login/", {"username": username, "password": password}).status_code == 302
    return client


def acme_with_people(password: str) -> Tenant:
    """The tenant ``acme`` with its owner ``owen`` and viewer ``vera``, and the operator ``olga``."""
    tenant = tenant_create(slug="acme", name="Acme")
    member_add(tenant=tenant, username="owen", role=Role.OWNER, password=password)
    member_add(tenant=tenant, username="vera", role=Role.VIEWER, password=password)
    User.objects.create_user("olga", password=password, is_staff=True)
    return tenant
