#!/usr/bin/env bash
# GPU check of the CUDA paths, under 10 minutes: bash benchmarks/gpu_check.sh OUT_DIR
#  1. environment (nvidia-smi, torch, cuSPARSELt, torch-tensorrt presence)
#  2. CUDA unit tests of this repo's export/runtime packages (fast tier, they adapt to CUDA)
#  3. single layers 4096x4096, 4096x11008, 11008x4096 at 2048/4096/8192 tokens, fp16: torch dense vs
#     torch-sparse with cuSPARSELt and with CUTLASS, output error and speedup (target >= 1.3x)
#  4. a 2-block slice of the default model: torch-sparse vs dense numerics and latency, fp16
#  5. TensorRT engines (.ep and .engine) dense vs 2:4, only when torch-tensorrt is installed
# Each step has its own time limit and failure does not stop the others; results land in OUT_DIR.
set -uo pipefail
OUT="${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUT"
cd "$ROOT"
[ -f .venv/bin/activate ] && . .venv/bin/activate
PY="${PYTHON:-python}"
status=0
step() {  # step NAME SECONDS CMD...: run with a time limit, log to OUT/NAME.log, record the exit code
    local name="$1" limit="$2"; shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc" | tee -a "$OUT/steps.txt"
    tail -n 25 "$OUT/$name.log"
    [ "$rc" -eq 0 ] || status=1
}

step env 60 bash -c "nvidia-smi; $PY - <<'PY'
import importlib.util, json, torch
info = {'torch': torch.__version__, 'cuda': torch.version.cuda, 'available': torch.cuda.is_available()}
if torch.cuda.is_available():
    info['gpu'] = torch.cuda.get_device_name(); info['capability'] = torch.cuda.get_device_capability()
cs = getattr(torch.backends, 'cusparselt', None)
info['cusparselt'] = bool(cs and cs.is_available()); info['cusparselt_version'] = cs.version() if info['cusparselt'] else None
info['torch_tensorrt'] = importlib.util.find_spec('torch_tensorrt') is not None
info['onnxruntime_gpu'] = 'CUDAExecutionProvider' in __import__('onnxruntime').get_available_providers()
print(json.dumps(info, indent=2))
PY"
step unit_tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_runtime_torch_sparse.py \
    tests/test_export_eligibility.py tests/test_runtime_bench.py tests/test_export_tensorrt.py
step layers 240 "$PY" benchmarks/latency.py --skip-model --no-onnx --dtype float16 --tokens 2048,4096,8192 \
    --warmup 5 --iters 20 --out "$OUT/layers.json"
step model 120 "$PY" benchmarks/latency.py --skip-layers --no-onnx --max-layers 2 --batch 8 --seqlen 512 \
    --warmup 3 --iters 20 --out "$OUT/model.json"
if "$PY" -c "import torch_tensorrt" 2>/dev/null; then
    step tensorrt 240 "$PY" benchmarks/latency.py --skip-layers --no-onnx --tensorrt --max-layers 2 --batch 8 \
        --seqlen 512 --iters 20 --out "$OUT/tensorrt.json"
else
    echo "tensorrt skipped: torch-tensorrt not installed" | tee -a "$OUT/steps.txt"
fi
echo "results in $OUT (steps.txt, *.log, *.json); exit $status"
exit $status
