#!/usr/bin/env bash
# The compile backend on every torch release it supports (mrp_pass/_dynamo.py TESTED_TORCH, pyproject.toml):
# per release, a venv of its own with that torch and this project, then the tests of each torch-internals
# assumption (tests/test_dynamo_internals.py) and the backend end to end (tests/test_backend.py).
#   bash scripts/compat.sh [VERSION ...]      default: every supported release, e.g. 2.11.0 2.14.1
# Venvs are cached in $MRP_COMPAT_DIR (default ~/.cache/mrp_trt/compat/torch-VERSION) and installed once: PyPI's
# torch for Linux is a CUDA build, ~3 GB with its dependencies (2-6 minutes each here), so this tier is not part of
# the per-commit CI (.ci/run); run it when torch or the backend's use of dynamo changes. Needs no GPU.
# Results (one line per release) go to results/compat/torch-compat.md.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${MRP_COMPAT_DIR:-$HOME/.cache/mrp_trt/compat}"
PY="${PYTHON:-python3}"
versions=("$@")
if [ "${#versions[@]}" -eq 0 ]; then
    versions=(2.11.0 2.12.1 2.13.0 2.14.1 2.15.0)
fi
mkdir -p "$CACHE" "$ROOT/results/compat"
pip_install() {  # pip_install VENV ARGS...: this machine's pip settings, else none (a pip cap such as torch<=2.14.1
    # in /etc/xdg/pip refuses newer releases; the same install without the machine's config files takes PyPI's)
    local venv="$1"; shift
    "$venv/bin/python" -m pip install -q "$@" && return
    local cert=()
    [ -f /etc/ssl/certs/ca-certificates.crt ] && cert=(--cert /etc/ssl/certs/ca-certificates.crt)
    PIP_CONFIG_FILE=/dev/null "$venv/bin/python" -m pip install -q "${cert[@]}" "$@"
}
OUT="$ROOT/results/compat/torch-compat.md"
{
    echo "# The compile backend per torch release ($(date -u +%Y-%m-%d), $(uname -m), no GPU)"
    echo
    echo "bash scripts/compat.sh: tests/test_dynamo_internals.py + tests/test_backend.py in a venv per release."
    echo
    echo "| torch | transformers | dynamo assumptions | backend end to end | seconds |"
    echo "|---|---|---|---|---:|"
} >"$OUT"
status=0
for v in "${versions[@]}"; do
    venv="$CACHE/torch-$v"
    stamp="$venv/.mrp-compat-$( (cat "$ROOT/pyproject.toml"; echo "$v") | sha1sum | cut -c1-12)"
    if [ ! -f "$stamp" ]; then
        echo "== torch $v: installing into $venv (once)"
        [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
        if ! pip_install "$venv" "torch==$v" || ! pip_install "$venv" -e "$ROOT[dev,cpu]"; then
            echo "| $v | - | install failed | - | - |" >>"$OUT"
            status=1
            continue
        fi
        touch "$stamp"
    fi
    echo "== torch $v"
    start=$SECONDS
    tf=$("$venv/bin/python" -c "import transformers; print(transformers.__version__)" 2>/dev/null || echo "?")
    cd "$ROOT" || exit 1
    "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_dynamo_internals.py >"$CACHE/torch-$v.internals.log" 2>&1
    internals=$?
    "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_backend.py >"$CACHE/torch-$v.backend.log" 2>&1
    backend=$?
    word() { [ "$1" -eq 0 ] && echo "$(tail -n 1 "$2" | sed 's/ in [0-9.]*s.*//; s/=//g; s/^ *//')" || echo "FAILED (log: $2)"; }
    echo "| $v | $tf | $(word $internals "$CACHE/torch-$v.internals.log") | $(word $backend "$CACHE/torch-$v.backend.log") | $((SECONDS - start)) |" >>"$OUT"
    tail -n 1 "$CACHE/torch-$v.internals.log" "$CACHE/torch-$v.backend.log"
    [ $internals -eq 0 ] && [ $backend -eq 0 ] || status=1
done
cat "$OUT"
exit $status
