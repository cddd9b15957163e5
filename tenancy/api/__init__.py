"""The management API's demand side (/api/v1/): people, tokens, tenants, keys, prices, usage, audit.

Views are thin: they authenticate (tenancy.api.authentication), scope by tenant
(tenancy.access), and call the services of tenancy.services for every write.
"""
