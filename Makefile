# Everything runs from a project-local virtualenv that these targets create.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-unit test-live lint format bench clean

## run: install, migrate and serve the gateway on 127.0.0.1:$${PORT:-8000} (embedded SQLite, no Redis) with a Celery worker
run: $(STAMP) .env
	$(PY) manage.py migrate --noinput
	$(PY) manage.py serve --celery

## test: the whole test suite against the current environment (embedded default unless DATABASE_URL/REDIS_URL are set)
test: $(STAMP)
	$(PY) -m pytest

## test-unit / test-live: the two suites on their own (live: gateway and fake-upstream processes over sockets)
test-unit: $(STAMP)
	$(PY) -m pytest tests/unit

test-live: $(STAMP)
	$(PY) -m pytest tests/live

## lint: ruff (format check + lint) and mypy
lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

## bench: gateway vs direct-to-upstream (and LiteLLM if installed), see docs/performance.md
bench: $(STAMP)
	$(PY) -m bench.run

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Secrets for the embedded setup, generated once (mode 0600); real environment variables win.
.env: | $(STAMP)
	$(PY) manage.py genkeys --output .env

clean:
	rm -rf $(VENV) var .env
