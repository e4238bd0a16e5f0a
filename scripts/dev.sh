#!/usr/bin/env bash
# Set up .venv with the tested versions (constraints.txt) on first use, then run the demo or
# the tests. Re-installs when pyproject.toml or constraints.txt changed since the last install.
#   bash scripts/dev.sh demo     plan and train a GPT on 8 emulated CPU devices
#   bash scripts/dev.sh test     ruff + the test suite (the notebooks included)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.autoshard-installed
if [ ! -x .venv/bin/python ] || [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] \
   || [ constraints.txt -nt "$STAMP" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
  touch "$STAMP"
fi
case "${1:-}" in
  demo) shift; exec .venv/bin/python demo.py "$@" ;;
  test) shift
        .venv/bin/ruff check .
        # Two workers: the CI machine has 2 cores (AUTOSHARD_TEST_WORKERS=0 runs in one process).
        exec .venv/bin/python -m pytest -q -n "${AUTOSHARD_TEST_WORKERS:-2}" "$@" ;;
  *) echo "usage: bash scripts/dev.sh demo|test [args]" >&2; exit 2 ;;
esac
