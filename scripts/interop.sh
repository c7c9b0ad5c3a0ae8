#!/usr/bin/env bash
# The interop test tier: our compressed checkpoints against the real readers/writers, in venvs of their own.
# 1. $MRP_INTEROP_VENV (default .venv-interop): compressed-tensors 0.14.0.1, the last release that reads
#    sparse-24-bitmask, which needs transformers < 5 (the main venv has transformers 5): tests/test_interop.py.
# 2. $MRP_INTEROP_CURRENT_VENV (default .venv-interop-current): the latest transformers + compressed-tensors, which
#    dropped the format: tests/test_interop_current.py (loading our file must raise, naming the fix). Upgraded to
#    the newest releases when created, and again with MRP_INTEROP_UPGRADE=1.
# Both are created or reused through scripts/env.sh, then `pytest -m interop` runs. Extra args go to both pytests.
# Timing on 2 CPU cores: ~1 min with both venvs built; building them adds a few minutes each.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
(
    export MRP_VENV="${MRP_INTEROP_VENV:-$ROOT/.venv-interop}" MRP_EXTRAS="dev,cpu,interop"
    # shellcheck disable=SC1091
    . "$ROOT/scripts/env.sh"
    python -m pytest -q -m interop tests/test_interop.py "$@"
)
(
    export MRP_VENV="${MRP_INTEROP_CURRENT_VENV:-$ROOT/.venv-interop-current}" MRP_EXTRAS="dev"
    # shellcheck disable=SC1091
    . "$ROOT/scripts/env.sh"
    if [ ! -f "$MRP_VENV/.mrp-current-readers" ] || [ "${MRP_INTEROP_UPGRADE:-0}" = 1 ]; then
        # torch stays the build env.sh installed; only the two readers move to their newest releases
        python -m pip install -q --upgrade transformers compressed-tensors
        touch "$MRP_VENV/.mrp-current-readers"
    fi
    python -m pytest -q -m interop tests/test_interop_current.py "$@"
)
