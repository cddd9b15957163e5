"""The one settings module. Everything an operator changes comes from the environment.

See docs/configuration.md for the list; gateway/conf/checks.py reports what is missing or
malformed at start-up with stable check ids.
"""

from __future__ import annotations

import warnings
from datetime import timedelta
from pathlib import Path

from gateway.conf.env import (
    SQLITE_ENGINE,
    database_from_url,
    env_bool,
    env_float,
    env_int,
    env_list,
    env_rate,
    env_str,
    load_dotenv,
    redis_url,
)
from gateway.conf.files import private_directory, private_file

BASE_DIR = Path(__file__).resolve().parents[2]
# A local .env (written by `make run` on first start) supplies secrets in the
# embedded setup; real environment variables always win.
load_dotenv(BASE_DIR / ".env")

# Private to the gateway's user (0700): it holds the SQLite database, the usage journal and spool.
DATA_DIR = private_directory(Path(env_str("GATEWAY_DATA_DIR", str(BASE_DIR / "var"))))
SECRET_KEY = env_str("SECRET_KEY")
GATEWAY_ENCRYPTION_KEY = env_str("GATEWAY_ENCRYPTION_KEY")
DEBUG = env_bool("DEBUG", False)

# --- The HTTP server (`manage.py serve`; docs/operations.md, "Server limits") ---------------
HOST = env_str("HOST", "127.0.0.1")
PORT = env_int("PORT", 8000, minimum=1, maximum=65535)
# ASGI server used by `manage.py serve`: "uvicorn" (measured fastest) or "daphne".
GATEWAY_SERVER = env_str("GATEWAY_SERVER", "uvicorn")
# Open client connections at most; a request beyond it is answered 503 at once.
GATEWAY_MAX_CONNECTIONS = env_int("GATEWAY_MAX_CONNECTIONS", 1000, minimum=1)
# A request head (request line and headers) larger than this, or with more header lines, gets 431.
GATEWAY_MAX_HEADER_BYTES = env_int("GATEWAY_MAX_HEADER_BYTES", 32 * 1024, minimum=1024)
GATEWAY_MAX_HEADERS = env_int("GATEWAY_MAX_HEADERS", 100, minimum=8)
# Seconds a client has for a whole request head (from connecting, or from its first byte on a
# kept-alive connection), and for a whole request body after its head; then 408 and closed.
GATEWAY_HEADER_TIMEOUT = env_float("GATEWAY_HEADER_TIMEOUT", 10.0, minimum=0.1)
GATEWAY_BODY_TIMEOUT = env_float("GATEWAY_BODY_TIMEOUT", 60.0, minimum=0.1)
# An idle kept-alive connection is closed after this many seconds (keep it above a proxy's).
GATEWAY_KEEP_ALIVE_TIMEOUT = env_int("GATEWAY_KEEP_ALIVE_TIMEOUT", 5, minimum=1)
# Addresses of reverse proxies whose X-Forwarded-For/-Proto are believed (client address and
# scheme); empty: the headers are ignored and the peer address is the client.
GATEWAY_FORWARDED_ALLOW_IPS = env_list("GATEWAY_FORWARDED_ALLOW_IPS")

# --- The admin behind a TLS proxy (docs/operations.md, "Production deployment") --------------
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")
# The header a TLS-terminating proxy sets to "https" (e.g. X-Forwarded-Proto); unset: none.
_proxy_ssl_header = env_str("SECURE_PROXY_SSL_HEADER")
SECURE_PROXY_SSL_HEADER = (
    ("HTTP_" + _proxy_ssl_header.upper().replace("-", "_"), "https") if _proxy_ssl_header else None
)
# Clients reach the gateway over HTTPS: cookies are Secure and the admin sends HSTS.
GATEWAY_HTTPS = env_bool("GATEWAY_HTTPS", False)
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = GATEWAY_HTTPS
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 365 * 24 * 3600 if GATEWAY_HTTPS else 0)
# Admin login throttling (django-axes): after this many failures from one address, or for one
# username, further attempts are refused (429) before any password is hashed, for the cool-off.
AXES_FAILURE_LIMIT = env_int("GATEWAY_ADMIN_LOGIN_FAILURES", 5, minimum=1)
AXES_COOLOFF_TIME = timedelta(seconds=env_float("GATEWAY_ADMIN_LOCKOUT_SECONDS", 900.0, minimum=1.0))
AXES_LOCKOUT_PARAMETERS = ["ip_address", "username"]
AXES_RESET_ON_SUCCESS = True
# The client address is the connection's peer (the server rewrites it from X-Forwarded-For only
# for GATEWAY_FORWARDED_ALLOW_IPS): a header a client sets itself never picks the lockout key.
AXES_IPWARE_META_PRECEDENCE_ORDER = ["REMOTE_ADDR"]
# The console's session: it ends this many seconds after sign-in (and when the browser closes
# is not relied on); sign-in and sign-out pages live under /console/.
SESSION_COOKIE_AGE = env_int("GATEWAY_CONSOLE_SESSION_SECONDS", 8 * 3600, minimum=60)
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
# The issuer an authenticator app shows next to a console TOTP device.
OTP_TOTP_ISSUER = "Responses gateway"
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", "django.contrib.auth.backends.ModelBackend"]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 12}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "axes",
    # The console's TOTP second factor (tenancy/console/otp.py) and its htmx requests.
    "django_otp",
    "django_otp.plugins.otp_totp",
    "django_htmx",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "gateway",
    "tenancy",
    "accounts",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # The admin's CSS and JavaScript, served by the process itself (no collectstatic needed).
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django_otp.middleware.OTPMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "tenancy.console.security.ConsoleSecurityHeadersMiddleware",
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "gateway.conf.urls"
ASGI_APPLICATION = "gateway.conf.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "tenancy.console.common.operator_context",
            ]
        },
    }
]

# Every database use is bounded: seconds to connect (PostgreSQL), per statement (PostgreSQL,
# 0 = none) and waiting for SQLite's write lock.
GATEWAY_DB_CONNECT_TIMEOUT = env_float("GATEWAY_DB_CONNECT_TIMEOUT", 5.0, minimum=1.0)
GATEWAY_DB_STATEMENT_TIMEOUT = env_float("GATEWAY_DB_STATEMENT_TIMEOUT", 30.0, minimum=0.0)
GATEWAY_SQLITE_BUSY_TIMEOUT = env_float("GATEWAY_SQLITE_BUSY_TIMEOUT", 20.0, minimum=0.0)
DATABASE_URL = env_str("DATABASE_URL")
DATABASES = {
    "default": database_from_url(
        DATABASE_URL,
        str(DATA_DIR / "gateway.sqlite3"),
        connect_timeout=GATEWAY_DB_CONNECT_TIMEOUT,
        statement_timeout=GATEWAY_DB_STATEMENT_TIMEOUT,
        sqlite_busy_timeout=GATEWAY_SQLITE_BUSY_TIMEOUT,
    )
}
if DATABASES["default"]["ENGINE"] == SQLITE_ENGINE:
    # Created 0600 before SQLite opens it: its WAL and shared-memory files take the same mode.
    private_file(Path(DATABASES["default"]["NAME"]))
    # A file, not memory: live test processes share the test database.
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test.sqlite3")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Redis is optional: unset means one process holds everything in memory.
REDIS_URL = redis_url()

if REDIS_URL:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [REDIS_URL]}}}
    CELERY_BROKER_URL = REDIS_URL
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    # A broker that needs no server: kombu's filesystem transport under DATA_DIR.
    CELERY_BROKER_URL = "filesystem://"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(private_directory(DATA_DIR / "celery" / "queue")),
        "data_folder_out": str(DATA_DIR / "celery" / "queue"),
        "processed_folder": str(private_directory(DATA_DIR / "celery" / "processed")),
        "control_folder": str(private_directory(DATA_DIR / "celery" / "control")),
        "store_processed": False,
    }
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_TASK_IGNORE_RESULT = True

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True
STATIC_URL = "static/"
# WhiteNoise serves the apps' static files (the admin's) straight from their packages: there is
# no STATIC_ROOT and no collectstatic step. Under ASGI Django reads WhiteNoise's file iterator in a
# worker thread (the admin's files are small) and warns that it does: expected, so not shown.
WHITENOISE_USE_FINDERS = True
warnings.filterwarnings(
    "ignore", "StreamingHttpResponse must consume synchronous iterators", Warning, "django.core.handlers.asgi"
)

# --- The management API (/api/v1/; docs/api.md) ------------------------------------------
# Failed token authentications from one address within the window, before it gets 429.
GATEWAY_API_AUTH_FAILURES = env_int("GATEWAY_API_AUTH_FAILURES", 20, minimum=1)
GATEWAY_API_AUTH_WINDOW = env_int("GATEWAY_API_AUTH_WINDOW", 300, minimum=1)
REST_FRAMEWORK = {
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "tenancy.api.authentication.AccessTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "accounts.infra.api.IdCursorPagination",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "accounts.infra.api.api_exception_handler",
    "DEFAULT_THROTTLE_CLASSES": [
        "rest_framework.throttling.AnonRateThrottle",
        "rest_framework.throttling.UserRateThrottle",
    ],
    "DEFAULT_THROTTLE_RATES": {
        "anon": env_rate("GATEWAY_API_ANON_RATE", "60/min"),
        "user": env_rate("GATEWAY_API_USER_RATE", "1200/min"),
    },
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Responses Gateway management API",
    "DESCRIPTION": "Tenants, members, tokens, API keys, limits, pools, upstream accounts, usage and audit.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": "/api/v1",
    "COMPONENT_SPLIT_REQUEST": True,
    # Swagger UI from drf-spectacular-sidecar: served by the gateway itself, no CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "ENUM_NAME_OVERRIDES": {"HealthStateEnum": "accounts.models.HEALTH_STATES"},
}

# --- Single sign-on: OpenID Connect (tenancy/oidc.py; docs/api.md) -------------------------
# Off unless configured: setting any of these turns it on, and gateway.E020 names what is missing.
GATEWAY_OIDC_ISSUER = env_str("GATEWAY_OIDC_ISSUER")
GATEWAY_OIDC_CLIENT_ID = env_str("GATEWAY_OIDC_CLIENT_ID")
GATEWAY_OIDC_CLIENT_SECRET = env_str("GATEWAY_OIDC_CLIENT_SECRET")
GATEWAY_OIDC_AUTHORIZATION_ENDPOINT = env_str("GATEWAY_OIDC_AUTHORIZATION_ENDPOINT")
GATEWAY_OIDC_TOKEN_ENDPOINT = env_str("GATEWAY_OIDC_TOKEN_ENDPOINT")
GATEWAY_OIDC_JWKS_ENDPOINT = env_str("GATEWAY_OIDC_JWKS_ENDPOINT")
GATEWAY_OIDC_USERINFO_ENDPOINT = env_str("GATEWAY_OIDC_USERINFO_ENDPOINT")
GATEWAY_OIDC_ENABLED = any(
    (
        GATEWAY_OIDC_ISSUER,
        GATEWAY_OIDC_CLIENT_ID,
        GATEWAY_OIDC_CLIENT_SECRET,
        GATEWAY_OIDC_AUTHORIZATION_ENDPOINT,
        GATEWAY_OIDC_TOKEN_ENDPOINT,
        GATEWAY_OIDC_JWKS_ENDPOINT,
    )
)
GATEWAY_OIDC_SIGN_ALGO = env_str("GATEWAY_OIDC_SIGN_ALGO", "RS256")
# The claim naming the person (their username here), and the one listing "tenant_slug:role" entries.
GATEWAY_OIDC_USERNAME_CLAIM = env_str("GATEWAY_OIDC_USERNAME_CLAIM", "email")
GATEWAY_OIDC_TENANTS_CLAIM = env_str("GATEWAY_OIDC_TENANTS_CLAIM", "gateway_tenants")
# A person is an operator when this claim (a list or a string) holds this value; unset: untouched.
GATEWAY_OIDC_OPERATOR_CLAIM = env_str("GATEWAY_OIDC_OPERATOR_CLAIM")
GATEWAY_OIDC_OPERATOR_VALUE = env_str("GATEWAY_OIDC_OPERATOR_VALUE")
# mozilla-django-oidc reads its own names.
OIDC_RP_CLIENT_ID = GATEWAY_OIDC_CLIENT_ID
OIDC_RP_CLIENT_SECRET = GATEWAY_OIDC_CLIENT_SECRET
OIDC_OP_AUTHORIZATION_ENDPOINT = GATEWAY_OIDC_AUTHORIZATION_ENDPOINT
OIDC_OP_TOKEN_ENDPOINT = GATEWAY_OIDC_TOKEN_ENDPOINT
OIDC_OP_JWKS_ENDPOINT = GATEWAY_OIDC_JWKS_ENDPOINT or None
OIDC_OP_USER_ENDPOINT = GATEWAY_OIDC_USERINFO_ENDPOINT
OIDC_RP_SIGN_ALGO = GATEWAY_OIDC_SIGN_ALGO
OIDC_RP_SCOPES = env_str("GATEWAY_OIDC_SCOPES", "openid email profile")
OIDC_USE_PKCE = True
OIDC_TIMEOUT = env_float("GATEWAY_OIDC_TIMEOUT", 10.0, minimum=0.1)
OIDC_REDIRECT_REQUIRE_HTTPS = GATEWAY_HTTPS
# Where a browser lands after signing in (unless ?next= names a local page) or failing to.
LOGIN_REDIRECT_URL = env_str("GATEWAY_OIDC_LOGIN_REDIRECT_URL", "/api/docs/")
LOGIN_REDIRECT_URL_FAILURE = "/oidc/failed/"
LOGOUT_REDIRECT_URL = "/oidc/authenticate/"
# Last, after the password backends; it authenticates nobody while OIDC is off.
AUTHENTICATION_BACKENDS = [*AUTHENTICATION_BACKENDS, "tenancy.oidc.GatewayOidcBackend"]

# --- The data plane -------------------------------------------------------
# Largest request body accepted by /v1/* (bytes); larger ones are answered 413.
GATEWAY_MAX_BODY_BYTES = env_int("GATEWAY_MAX_BODY_BYTES", 16 * 1024 * 1024, minimum=1024)
# Upstream timeouts (seconds): connecting, and the longest silence while reading.
GATEWAY_UPSTREAM_CONNECT_TIMEOUT = env_float("GATEWAY_UPSTREAM_CONNECT_TIMEOUT", 10.0, minimum=0.01)
GATEWAY_UPSTREAM_READ_TIMEOUT = env_float("GATEWAY_UPSTREAM_READ_TIMEOUT", 600.0, minimum=0.01)
# Deadlines of one upstream answer (seconds): the whole of it, and the longest a stream may
# go without an event (keep-alive comments do not count) once it started.
GATEWAY_UPSTREAM_TOTAL_TIMEOUT = env_float("GATEWAY_UPSTREAM_TOTAL_TIMEOUT", 1800.0, minimum=0.1)
GATEWAY_UPSTREAM_IDLE_TIMEOUT = env_float("GATEWAY_UPSTREAM_IDLE_TIMEOUT", 300.0, minimum=0.1)
# Largest upstream answers taken: one SSE frame, and a whole non-streamed body (bytes).
GATEWAY_UPSTREAM_MAX_FRAME_BYTES = env_int("GATEWAY_UPSTREAM_MAX_FRAME_BYTES", 16 * 1024 * 1024, minimum=64 * 1024)
GATEWAY_UPSTREAM_MAX_BODY_BYTES = env_int("GATEWAY_UPSTREAM_MAX_BODY_BYTES", 64 * 1024 * 1024, minimum=64 * 1024)
# httpx transport for upstream calls: "fast" (accounts/upstream/transport.py; fastest, measured) or "httpx".
GATEWAY_UPSTREAM_TRANSPORT = env_str("GATEWAY_UPSTREAM_TRANSPORT", "fast")
GATEWAY_UPSTREAM_MAX_CONNECTIONS = env_int("GATEWAY_UPSTREAM_MAX_CONNECTIONS", 1000, minimum=1)
# /v1/responses over a WebSocket (gateway/dataplane/socket.py): a socket without a message for
# this many seconds is closed; a connection lives at most this long (then the client reconnects);
# the contexts a connection keeps for continuation (previous_response_id) hold at most this many bytes.
GATEWAY_WS_IDLE_SECONDS = env_float("GATEWAY_WS_IDLE_SECONDS", 600.0, minimum=1.0)
GATEWAY_WS_MAX_SECONDS = env_float("GATEWAY_WS_MAX_SECONDS", 3600.0, minimum=1.0)
GATEWAY_WS_CONTEXT_BYTES = env_int("GATEWAY_WS_CONTEXT_BYTES", 64 * 1024 * 1024, minimum=1024)
# A comment frame is sent on a stream after this many idle seconds.
GATEWAY_SSE_KEEPALIVE_SECONDS = env_float("GATEWAY_SSE_KEEPALIVE_SECONDS", 15.0, minimum=0.05)
# How often buffered usage records leave the process: appended to the journal, or XADDed (seconds).
GATEWAY_USAGE_FLUSH_SECONDS = env_float("GATEWAY_USAGE_FLUSH_SECONDS", 0.05, minimum=0.01)
# Usage (bytes of JSON) a process holds in memory while its journal cannot be appended to
# (a full or failing disk); past it new requests are answered 503 (gateway/metering/journal.py).
GATEWAY_USAGE_BUFFER_BYTES = env_int("GATEWAY_USAGE_BUFFER_BYTES", 64 * 1024 * 1024, minimum=64 * 1024)
GATEWAY_ALERT_WEBHOOK_URL = env_str("GATEWAY_ALERT_WEBHOOK_URL")  # budget alerts are POSTed here as JSON, if set
# Failover: attempts per request (accounts tried) and the total time they may take.
GATEWAY_MAX_ATTEMPTS = env_int("GATEWAY_MAX_ATTEMPTS", 3, minimum=1, maximum=20)
GATEWAY_FAILOVER_DEADLINE = env_float("GATEWAY_FAILOVER_DEADLINE", 30.0, minimum=0.1)
# A stream's first frames are held back until real output arrives, at most this long.
GATEWAY_STREAM_HOLD_SECONDS = env_float("GATEWAY_STREAM_HOLD_SECONDS", 10.0, minimum=0.0)
# Output tokens reserved against budgets and tpm when a request sets no max_output_tokens.
GATEWAY_DEFAULT_OUTPUT_RESERVE = env_int("GATEWAY_DEFAULT_OUTPUT_RESERVE", 4096, minimum=0)
# The config snapshot is rebuilt this often (seconds) even without a change token, so edits
# made outside the services (raw SQL) arrive eventually.
GATEWAY_SNAPSHOT_MAX_AGE = env_float("GATEWAY_SNAPSHOT_MAX_AGE", 60.0, minimum=1.0)
# API keys are loaded on first use and kept in a bounded cache (the one stored longest ago goes first):
# at most this many known keys, and as many unknown prefixes (gateway/config/keys.py).
GATEWAY_KEY_CACHE_SIZE = env_int("GATEWAY_KEY_CACHE_SIZE", 100_000, minimum=1)
# Each gateway process also writes usage to the database (else run `manage.py usage_drain`).
GATEWAY_USAGE_DRAINER = env_bool("GATEWAY_USAGE_DRAINER", True)

# --- Observability (docs/operations.md, "Observability") -------------------
# GET /metrics (Prometheus text format) and the per-request counting behind it.
GATEWAY_METRICS = env_bool("GATEWAY_METRICS", True)
# Bearer token that /metrics requires; unset: /metrics answers loopback clients only.
GATEWAY_METRICS_TOKEN = env_str("GATEWAY_METRICS_TOKEN")
# Tenant and key-prefix labels on the request metrics (cardinality grows with tenants and keys).
GATEWAY_METRICS_TENANT_LABELS = env_bool("GATEWAY_METRICS_TENANT_LABELS", False)
# How often each process samples its gauges (account health, usage backlog, snapshot age...).
GATEWAY_METRICS_SAMPLE_SECONDS = env_float("GATEWAY_METRICS_SAMPLE_SECONDS", 5.0, minimum=0.1)
# Several worker processes share their metrics through this directory (prometheus-client's
# multiprocess mode); `manage.py serve --workers N` (N > 1) sets one under the data directory.
PROMETHEUS_MULTIPROC_DIR = env_str("PROMETHEUS_MULTIPROC_DIR")
# Log lines: "json" (one object a line) or "text"; JSON unless DEBUG.
GATEWAY_LOG_FORMAT = env_str("GATEWAY_LOG_FORMAT", "text" if DEBUG else "json")
# One line per data-plane request on the logger gateway.access.
GATEWAY_ACCESS_LOG = env_bool("GATEWAY_ACCESS_LOG", True)
# /readyz answers 503 when more usage records than this wait to be written.
GATEWAY_READY_MAX_BACKLOG = env_int("GATEWAY_READY_MAX_BACKLOG", 100_000, minimum=1)
# OpenTelemetry traces: off unless set (the SDK reads its other OTEL_* variables itself).
OTEL_EXPORTER_OTLP_ENDPOINT = env_str("OTEL_EXPORTER_OTLP_ENDPOINT")
OTEL_SERVICE_NAME = env_str("OTEL_SERVICE_NAME", "responses-gateway")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"()": "gateway.observability.logs.TextFormatter"},
        "json": {
            "()": "pythonjsonlogger.orjson.OrjsonFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
            "timestamp": False,
        },
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "json" if GATEWAY_LOG_FORMAT == "json" else "plain"}
    },
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"httpx": {"level": "WARNING"}, "daphne": {"level": "WARNING"}, "axes": {"level": "WARNING"}},
}

# Billing (docs/billing.md). The beat task rolls up recent usage this often (seconds).
GATEWAY_BILLING_ROLLUP_SECONDS = env_float("GATEWAY_BILLING_ROLLUP_SECONDS", 120.0, minimum=5.0)
# Record ids re-read below the last run's highest id (batches committed after a higher id was seen).
GATEWAY_BILLING_ID_OVERLAP = env_int("GATEWAY_BILLING_ID_OVERLAP", 50_000, minimum=0)
# Hours recomputed once a day by the sweep task, a safety net for records no run saw (0: no sweep).
GATEWAY_BILLING_SWEEP_HOURS = env_int("GATEWAY_BILLING_SWEEP_HOURS", 48, minimum=0)
# Days of usage records kept (0: forever). On PostgreSQL older monthly partitions are dropped
# (never DELETEd); their rollups and statements stay.
GATEWAY_USAGE_RETENTION_DAYS = env_int("GATEWAY_USAGE_RETENTION_DAYS", 0, minimum=0)
# Days stored responses and conversations (the stateful policy) are kept, for tenants without
# their own stored_ttl_days; the hourly task stored-objects-expire deletes older ones.
GATEWAY_STORED_TTL_DAYS = env_int("GATEWAY_STORED_TTL_DAYS", 30, minimum=1)
CELERY_BEAT_SCHEDULE = {
    "stored-objects-expire": {"task": "tenancy.tasks.stored_objects_expire", "schedule": 3_600.0},
    "billing-rollup-recent": {
        "task": "tenancy.tasks.billing_rollup_recent",
        "schedule": GATEWAY_BILLING_ROLLUP_SECONDS,
    },
    "billing-rollup-sweep": {"task": "tenancy.tasks.billing_rollup_sweep", "schedule": 86_400.0},
    "usage-partitions-maintain": {"task": "tenancy.tasks.usage_partitions_maintain", "schedule": 3_600.0},
}
