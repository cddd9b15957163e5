"""The management API's supply side (/api/v1/): pools, upstream accounts, health, routes."""
