#!/usr/bin/env bash
# The interop test tier: our compressed checkpoints against the real readers/writers, in a venv of its own
# (compressed-tensors 0.14.0.1, the last release that reads sparse-24-bitmask, needs transformers < 5; the
# main venv has transformers 5). Creates or reuses $MRP_INTEROP_VENV (default .venv-interop) through
# scripts/env.sh, then runs `pytest -m interop`. Extra args go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export MRP_VENV="${MRP_INTEROP_VENV:-$ROOT/.venv-interop}" MRP_EXTRAS="dev,cpu,interop"
# shellcheck disable=SC1091
. "$ROOT/scripts/env.sh"
cd "$ROOT"
python -m pytest -q -m interop tests/test_interop.py "$@"
