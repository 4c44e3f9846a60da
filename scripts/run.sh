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
$BIN/python manage.py collectstatic --noinput --verbosity 0

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

$BIN/celery -A config worker -B --loglevel INFO --concurrency 2 \
  --schedule "$VAR/celerybeat-schedule" &
pids+=($!)
echo "Consilium: http://127.0.0.1:${PORT:-8000}/  (API docs /api/docs/, health /healthz)"
$BIN/python manage.py runserver "127.0.0.1:${PORT:-8000}" --noreload &
pids+=($!)
wait -n "${pids[@]}"
