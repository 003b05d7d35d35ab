#!/usr/bin/env bash
# Issue 27's device run: the test suite's GPU half, then benchmarks/gpu_check.py's receipts.
# Run on the device machine from the repository root, after benchmarks/gpu_prepare.sh here
# (it puts what the image lacks in .gpu-carry/, which travels with the command):
#   run: bash benchmarks/gpu_check.sh      carry: [".gpu-carry"]      timeout_s: 540
# Budget on a bare H100: about 1.5 minutes of tests, 6 of receipts. Results go to $OUT.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"

# The image has torch, triton, transformers, click, pyyaml and pytest, not pydantic: its wheels travel.
python3 -m venv --system-site-packages /tmp/qk-venv && . /tmp/qk-venv/bin/activate
pip install -q --no-index --no-deps .gpu-carry/wheels/*.whl
pip install -q --no-index --no-deps --no-build-isolation . || exit 1

# The runtime imports without what serving and evaluation add (lm-eval, starlette, uvicorn, gguf, compressed-tensors).
python3 - <<'PY' | tee "$OUT/imports.txt" || exit 1
import sys
import quantkit.runtime.engine, quantkit.runtime.model_runner, quantkit.pipeline  # noqa: E401
extra = sorted({m.split(".")[0] for m in sys.modules} & {"lm_eval", "starlette", "uvicorn", "gguf", "compressed_tensors"})
print("runtime imports:", "ok" if not extra else f"pulled in {extra}")
sys.exit(1 if extra else 0)
PY

# The CPU side of the agreement check runs the plain-torch paths: no C++ build on the device.
export QUANTKIT_CPU_KERNELS=0 OMP_WAIT_POLICY=PASSIVE
QUANTKIT_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider \
  tests/test_triton_gemm.py tests/test_triton_attention.py tests/test_triton_engine.py tests/test_quantize_device.py \
  > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; tail -5 "$OUT/tests.log"
timeout 330 python3 benchmarks/gpu_check.py --device cuda --tokenizer .gpu-carry/tokenizer --out "$OUT/gpu_check.json" 2>&1 | tee "$OUT/gpu_check.log" | grep -v "^  "
