"""Settings for the test suite: the project's settings under a test environment.

pytest-django loads settings before any conftest runs, so the environment the
tests need is fixed here. Live test processes (gateway, fake upstream) get the
same variables and so share the data directory, the test database and Redis.
"""

import os
import tempfile

os.environ["GATEWAY_DATA_DIR"] = tempfile.mkdtemp(prefix="gw-test-")
os.environ.setdefault("SECRET_KEY", "test-only-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz")
os.environ.setdefault("GATEWAY_ENCRYPTION_KEY", "Y7dS4m0Y2mN5rVwq8a7Hq1hOQW3p0vV3mJk8m4XfQ9A=")
os.environ.setdefault("GATEWAY_SSE_KEEPALIVE_SECONDS", "0.3")
os.environ.setdefault("GATEWAY_USAGE_FLUSH_SECONDS", "0.05")
os.environ.setdefault("GATEWAY_UPSTREAM_READ_TIMEOUT", "5")

from gateway.conf.settings import *  # noqa: F403
