#!/usr/bin/env bash
# Fills .gpu-carry/ for benchmarks/gpu_check.sh: pydantic's wheels for the device image's Python
# (3.12, x86_64; the image has no pydantic and no network) and SmolLM2's tokenizer files.
set -eu
cd "$(dirname "$0")/.."
rm -rf .gpu-carry && mkdir -p .gpu-carry/wheels .gpu-carry/tokenizer
pip download -q --dest .gpu-carry/wheels --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  --implementation cp pydantic pydantic-core annotated-types typing-inspection
python3 - <<'PY'
import shutil
from quantkit.sources import resolve_model
model = resolve_model("smollm2-135m")
for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(model / name, ".gpu-carry/tokenizer/" + name)
PY
du -sh .gpu-carry
