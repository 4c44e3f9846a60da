# Consilium — the interface contract: `make run`, `make test`, `make lint`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PYTHONUNBUFFERED := 1

.PHONY: run test lint venv bench docs clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip==25.2"
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

# The whole system on embedded defaults: SQLite + an embedded broker under var/, demo network.
run: venv
	bash scripts/run.sh

# The whole suite against PostgreSQL and a real broker.
test: venv
	DJANGO_SETTINGS_MODULE=config.settings.test $(BIN)/python scripts/check_services.py
	DJANGO_SETTINGS_MODULE=config.settings.test $(BIN)/python -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	DJANGO_SETTINGS_MODULE=config.settings.test $(BIN)/mypy .
	mkdir -p var && DEBUG=1 $(BIN)/python manage.py makemigrations --check --dry-run

docs: venv
	DEBUG=1 $(BIN)/python manage.py spectacular --file var/openapi.yaml

bench: venv
	$(BIN)/python bench/registry.py

clean:
	rm -rf var/ .mypy_cache .ruff_cache .pytest_cache
