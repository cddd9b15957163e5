"""The one settings module. Everything an operator changes comes from the environment.

See docs/configuration.md for the list; gateway/conf/checks.py reports what is missing or
malformed at start-up with stable check ids.
"""

from __future__ import annotations

from pathlib import Path

from gateway.conf.env import (
    database_from_url,
    env_bool,
    env_float,
    env_int,
    env_str,
    load_dotenv,
    redis_url,
)

BASE_DIR = Path(__file__).resolve().parents[2]
# A local .env (written by `make run` on first start) supplies secrets in the
# embedded setup; real environment variables always win.
load_dotenv(BASE_DIR / ".env")

DATA_DIR = Path(env_str("GATEWAY_DATA_DIR", str(BASE_DIR / "var")))
DATA_DIR.mkdir(parents=True, exist_ok=True)
SECRET_KEY = env_str("SECRET_KEY")
GATEWAY_ENCRYPTION_KEY = env_str("GATEWAY_ENCRYPTION_KEY")
DEBUG = env_bool("DEBUG", False)
PORT = env_int("PORT", 8000, minimum=1, maximum=65535)
ALLOWED_HOSTS = [h.strip() for h in env_str("ALLOWED_HOSTS", "*").split(",") if h.strip()]

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "channels",
    "gateway",
    "tenancy",
    "accounts",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
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
            ]
        },
    }
]

DATABASE_URL = env_str("DATABASE_URL")
DATABASES = {"default": database_from_url(DATABASE_URL, str(DATA_DIR / "gateway.sqlite3"))}
if str(DATABASES["default"]["ENGINE"]).endswith("sqlite3"):
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
        "data_folder_in": str(DATA_DIR / "celery" / "queue"),
        "data_folder_out": str(DATA_DIR / "celery" / "queue"),
        "processed_folder": str(DATA_DIR / "celery" / "processed"),
        "store_processed": False,
    }
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_TASK_IGNORE_RESULT = True

AUTH_PASSWORD_VALIDATORS: list[dict[str, str]] = []
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"

REST_FRAMEWORK = {
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
}

# --- The data plane -------------------------------------------------------
# Largest request body accepted by /v1/* (bytes); larger ones are answered 413.
GATEWAY_MAX_BODY_BYTES = env_int("GATEWAY_MAX_BODY_BYTES", 16 * 1024 * 1024, minimum=1024)
# Upstream timeouts (seconds): connecting, and the longest silence while reading.
GATEWAY_UPSTREAM_CONNECT_TIMEOUT = env_float("GATEWAY_UPSTREAM_CONNECT_TIMEOUT", 10.0, minimum=0.01)
GATEWAY_UPSTREAM_READ_TIMEOUT = env_float("GATEWAY_UPSTREAM_READ_TIMEOUT", 600.0, minimum=0.01)
# httpx transport for upstream calls: "fast" (accounts/upstream/transport.py; fastest, measured), "aiohttp" or "httpx".
GATEWAY_UPSTREAM_TRANSPORT = env_str("GATEWAY_UPSTREAM_TRANSPORT", "fast")
GATEWAY_UPSTREAM_MAX_CONNECTIONS = env_int("GATEWAY_UPSTREAM_MAX_CONNECTIONS", 1000, minimum=1)
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
# Freeze what is alive after each config snapshot load out of the cyclic GC's sight (short pauses).
GATEWAY_GC_FREEZE = env_bool("GATEWAY_GC_FREEZE", True)
# Each gateway process also writes usage to the database (else run `manage.py usage_drain`).
GATEWAY_USAGE_DRAINER = env_bool("GATEWAY_USAGE_DRAINER", True)
# ASGI server used by `manage.py serve`: "uvicorn" (measured fastest) or "daphne".
GATEWAY_SERVER = env_str("GATEWAY_SERVER", "uvicorn")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"httpx": {"level": "WARNING"}, "daphne": {"level": "WARNING"}},
}
