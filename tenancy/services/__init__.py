"""Writes of the demand side, one module per domain (import from the module itself):

- ``tenants``: tenant_create, tenant_update
- ``keys``: apikey_create, apikey_update, apikey_revoke
- ``limits``: the limits of tenants and keys (TenantLimits, ApiKeyLimits) and the shared
  cleaning of limit and money values
- ``prices``: price_set
- ``usage``: usage_records_write (the metering writers' batch insert)
- ``alerts``: budget_alert_record, budget_alert_deliver (the webhook, through the
  outbound-HTTP seam accounts.upstream.client)

Every write validates its input and raises django.core.exceptions.ValidationError with a
human sentence on bad input, so commands and views can show it as is. Config-relevant
writes (tenants, keys and their limits, prices) go through ``Model.save()`` so the post_save
signals of gateway.config.notify announce them to every replica, which applies them on its
next request; the usage path deliberately does not.
"""
