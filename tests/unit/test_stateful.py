"""The stateful policy's control side: commands, the snapshot's view, retention and purge."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from gateway.config.snapshot import key_info
from tenancy.models import Conversation, StoredResponse
from tenancy.selectors import apikeys_for_snapshot
from tenancy.services import stored
from tenancy.services.keys import apikey_create
from tenancy.services.tenants import tenant_create
from tenancy.tasks import stored_objects_expire

pytestmark = pytest.mark.django_db


def _policy() -> bool:
    return key_info(apikeys_for_snapshot()[0], {}).stateful


def test_commands_set_the_policy_and_the_key_overrides_the_tenant() -> None:
    tenant = tenant_create(slug="acme", name="Acme")
    api_key, _ = apikey_create(tenant=tenant, name="k")
    assert _policy() is False
    out = StringIO()
    call_command("tenant_update", "acme", "--stateful", "on", "--stored-ttl-days", "7", stdout=out)
    assert "Stateful: on; stored objects kept 7 days" in out.getvalue()
    assert _policy() is True
    call_command("apikey_update", api_key.prefix, "--stateful", "off", stdout=StringIO())
    assert _policy() is False
    call_command("apikey_update", api_key.prefix, "--stateful", "none", stdout=StringIO())
    assert _policy() is True
    with pytest.raises(CommandError):
        call_command("tenant_update", "acme", "--stateful", "none", stdout=StringIO())
    with pytest.raises(CommandError):
        call_command("apikey_update", api_key.prefix, "--stateful", "maybe", stdout=StringIO())


def test_retention_task_and_purge() -> None:
    tenant = tenant_create(slug="acme", name="Acme")
    other = tenant_create(slug="other", name="Other")
    api_key, _ = apikey_create(tenant=tenant, name="k")
    other_key, _ = apikey_create(tenant=other, name="k")
    for key, name in ((api_key, "resp_a"), (other_key, "resp_b")):
        StoredResponse.objects.create(id=name, tenant=key.tenant, api_key=key, status="completed", model="m")
        stored.conversation_create(
            tenant_id=key.tenant_id, api_key_id=key.pk, metadata={}, items=[{"role": "user", "content": "x"}]
        )
    StoredResponse.objects.filter(pk="resp_a").update(created_at=timezone.now() - timedelta(days=40))
    assert stored_objects_expire() == {"responses": 1, "conversations": 0}
    assert list(StoredResponse.objects.values_list("id", flat=True)) == ["resp_b"]
    out = StringIO()
    call_command("stored_purge", "--key", other_key.prefix, stdout=out)
    assert "Deleted 1 responses and 1 conversations." in out.getvalue()
    call_command("stored_purge", "--tenant", "acme", stdout=StringIO())
    assert not Conversation.objects.exists()
    assert not StoredResponse.objects.exists()
    with pytest.raises(CommandError):
        call_command("stored_purge", stdout=StringIO())
