#!/usr/bin/env bash
# Install what the tests need (into .venv) and run the fast test tier. Extra args go to pytest,
# e.g. `bash scripts/test.sh -m slow` for the real-model tests.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/env.sh"
cd "$ROOT"
ruff check .
python -m pytest -q "$@"
