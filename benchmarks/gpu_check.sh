#!/usr/bin/env bash
# GPU check of the torch-sparse paths in one run, 7 minutes at most on one GPU including CUDA start-up:
#   bash benchmarks/gpu_check.sh [OUT_DIR] [--smoke]        (OUT_DIR default results/gpu)
# Steps (benchmarks/gpu_check.py; each in its own process under a time limit, a failure does not stop the others):
#   env      versions, GPU, capability, backends this GPU gets (CUTLASS on 8.x only, cuSPARSELt on >= 8.0)
#   unit     the gpu-marked tests and the CPU tests of the sparse rules (when pytest is installed)
#   layers   SmolLM2-135M and LLaMA-7B linear shapes, fp16 + bf16, 1..8192 tokens, dense vs 2:4 per backend
#   smollm2  SmolLM2-135M from its config (random weights), 2:4: prefill 2048/8192, decode sizes 1/16/128
#   compile  torch.compile(model, backend="mrp_trt", options={"engine": "torch-sparse"}) on SmolLM2 vs dense
#   llama7b  a 4-block LLaMA-7B-size model, the same as smollm2 (and without the LM head)
#   report   OUT_DIR/results.md (markdown tables) and OUT_DIR/results.json
# Each step rewrites its JSON after every row, so a step stopped at its limit keeps the rows it finished.
# OUT_DIR ends with four files (the device tool returns at most 8): results.md, results.json, steps.txt and
# logs.tar.gz (every step's log and JSON).
# Uses system python3 (or $PYTHON); no venv, no downloads, no TensorRT needed.
# --smoke (or MRP_GPU_CHECK_SMOKE=1): tiny sizes on the CPU with emulated kernels, seconds; tests run it.
set -uo pipefail
OUT="results/gpu"
SMOKE=""
for arg in "$@"; do
    case "$arg" in
        --smoke) SMOKE="--smoke" ;;
        *) OUT="$arg" ;;
    esac
done
[ -n "${MRP_GPU_CHECK_SMOKE:-}" ] && SMOKE="--smoke"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
mkdir -p "$OUT"
: >"$OUT/steps.txt"
PY="${PYTHON:-python3}"
# Seconds for everything; the step limits below add up to it, and each shrinks to what is left, with REPORT_S
# kept for the report, so the total holds however the steps go.
BUDGET="${MRP_GPU_CHECK_BUDGET:-420}"
REPORT_S=20
status=0
step() {  # step NAME SECONDS CMD...: run under min(SECONDS, budget left), log to OUT/NAME.log, record the exit code
    local name="$1" limit="$2"; shift 2
    local reserve=$REPORT_S
    [ "$name" = report ] && reserve=0
    local left=$((BUDGET - reserve - SECONDS))
    [ "$left" -lt "$limit" ] && limit="$left"
    if [ "$limit" -le 5 ]; then
        echo "$name skipped: time budget spent" | tee -a "$OUT/steps.txt"; status=1; return
    fi
    echo "== $name (limit ${limit}s, ${SECONDS}s elapsed)"
    timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc ($((SECONDS))s)" | tee -a "$OUT/steps.txt"
    tail -n 15 "$OUT/$name.log"
    [ "$rc" -eq 0 ] || status=1
}

step env 30 "$PY" benchmarks/gpu_check.py env --out "$OUT" $SMOKE
if [ -z "$SMOKE" ]; then
    if "$PY" -c "import pytest" 2>/dev/null; then
        step unit 60 "$PY" -m pytest -q -p no:cacheprovider -m "gpu or not gpu" tests/test_gpu_paths.py \
            tests/test_runtime_torch_sparse.py tests/test_export_eligibility.py tests/test_gpu_engines.py
    else
        echo "unit skipped: pytest not installed" | tee -a "$OUT/steps.txt"
    fi
fi
step layers 90 "$PY" benchmarks/gpu_check.py layers --out "$OUT" $SMOKE
step smollm2 60 "$PY" benchmarks/gpu_check.py smollm2 --out "$OUT" $SMOKE
step compile 100 "$PY" benchmarks/gpu_check.py compile --out "$OUT" $SMOKE
step llama7b 60 "$PY" benchmarks/gpu_check.py llama7b --out "$OUT" $SMOKE
step report "$REPORT_S" "$PY" benchmarks/gpu_check.py report --out "$OUT" $SMOKE
# Pack the logs and step JSONs (results.json holds the steps' JSON merged) into one archive.
(
    cd "$OUT" || exit
    packed=()
    for f in *.log env.json layers.json smollm2.json compile.json llama7b.json; do [ -e "$f" ] && packed+=("$f"); done
    [ "${#packed[@]}" -gt 0 ] && tar czf logs.tar.gz "${packed[@]}" && rm -f "${packed[@]}"
)
echo "results in $OUT (results.md, results.json, steps.txt, logs.tar.gz); exit $status"
exit $status
