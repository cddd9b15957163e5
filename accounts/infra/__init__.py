"""Plumbing shared by the three apps: background batch writing, Redis clients.

It sits in ``accounts`` because that is the bottom layer: imports run ``gateway`` ->
``tenancy`` -> ``accounts`` (tests/unit/test_layout.py), so the one copy of a piece of
plumbing that all three use must live here. Nothing in it knows about accounts.
"""
