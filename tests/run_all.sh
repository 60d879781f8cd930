#!/usr/bin/env bash
# Runs the whole suite: the single-device tests, then tests/multidevice/ with 8 virtual CPU devices
# (XLA_FLAGS must be set before jax is imported, hence a separate pytest process).
# Any failure, and pytest's exit code 5 (no tests collected), fails the run.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export JAX_PLATFORMS=cpu
status=0

run() {
  "$PY" -m pytest "$@"
  local rc=$?
  if [ $rc -eq 5 ]; then echo "run_all: pytest collected no tests for: $*" >&2; rc=1; fi
  [ $rc -ne 0 ] && status=1
  return 0
}

start=$(date +%s)
run tests --ignore=tests/multidevice -q -ra --durations=25 -n 2 --dist loadfile "$@"
if [ -d tests/multidevice ]; then
  XLA_FLAGS="--xla_force_host_platform_device_count=8" run tests/multidevice -q -ra --durations=10 -n 2 \
    --dist loadfile "$@"
fi
echo "run_all: suite took $(( $(date +%s) - start )) s, status $status"
exit $status
