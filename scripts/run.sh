#!/usr/bin/env bash
# make run: migrate, seed the demo network, then web server + Celery worker (with beat).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBUG="${DEBUG:-1}"
VAR="${VAR_DIR:-var}"  # the settings' VAR_DIR (database, broker, beat schedule, media)
mkdir -p "$VAR"
BIN=.venv/bin
$BIN/python manage.py migrate --noinput
$BIN/python manage.py seed_demo
# The registry's FHIR view (Organization, HealthcareService, …) now, not at beat's first
# projection a minute after start: until then the mCSD searches would find nothing.
$BIN/python manage.py fhir_project_registry
$BIN/python manage.py collectstatic --noinput --verbosity 0
# The embedded broker's file now, not at the worker's first connection: /healthz looks for it.
$BIN/python manage.py shell -c "from core.health import embedded_broker_prepare; embedded_broker_prepare()"

# The port first: with another server on it, the health check below would hear that one.
if ! $BIN/python -c "import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', int(sys.argv[1])))" "${PORT:-8000}" 2>/dev/null; then
  echo "Port ${PORT:-8000} on 127.0.0.1 is in use: stop what holds it, or run PORT=8001 make run" >&2
  exit 1
fi

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

$BIN/celery -A config worker -B --loglevel INFO --concurrency 2 \
  --schedule "$VAR/celerybeat-schedule" &
pids+=($!)
$BIN/python manage.py runserver "127.0.0.1:${PORT:-8000}" --noreload &
pids+=($!)
# The address once /healthz answers 200 (the web server is up and sees the broker).
$BIN/python scripts/wait_healthy.py "http://127.0.0.1:${PORT:-8000}/healthz" 120 "${pids[-1]}" \
  && echo "Consilium is ready: http://127.0.0.1:${PORT:-8000}/  (API docs /api/docs/, health /healthz)"
wait -n "${pids[@]}"
