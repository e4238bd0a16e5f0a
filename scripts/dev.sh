#!/usr/bin/env bash
# Set up a virtualenv with the pinned dependencies (once), then run the demo or the tests.
#   bash scripts/dev.sh demo     plan and train a GPT on 8 emulated CPU devices
#   bash scripts/dev.sh test     ruff + the test suite
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import autoshard, pytest, ruff" 2>/dev/null; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[dev]"
fi
case "${1:-}" in
  demo) shift; exec .venv/bin/python demo.py "$@" ;;
  test) shift
        .venv/bin/ruff check .
        exec .venv/bin/python -m pytest -q "$@" ;;
  *) echo "usage: bash scripts/dev.sh demo|test [args]" >&2; exit 2 ;;
esac
