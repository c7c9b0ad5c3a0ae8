#!/usr/bin/env bash
# The interop test tier: our compressed checkpoints against the real readers/writers, in a venv of its own
# (compressed-tensors 0.14.0.1, the last release that reads sparse-24-bitmask, needs transformers < 5; the
# main venv has transformers 5). Creates or reuses $MRP_INTEROP_VENV (default .venv-interop), then runs
# `pytest -m interop`. Extra args go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MRP_INTEROP_VENV:-$ROOT/.venv-interop}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.mrp-interop-installed-$(sha1sum "$ROOT/pyproject.toml" | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    python -m pip install -q --upgrade pip >/dev/null
    if ! python -c "import torch" 2>/dev/null; then
        if command -v nvidia-smi >/dev/null 2>&1; then
            python -m pip install -q torch
        else
            python -m pip install -q "torch==2.13.0"  # the CPU build (local wheel); never a CUDA download here
        fi
    fi
    python -m pip install -q -e "$ROOT[interop]" "pytest>=8"
    touch "$stamp"
fi
cd "$ROOT"
python -m pytest -q -m interop tests/test_interop.py "$@"
