#!/usr/bin/env bash
# Create the project's virtualenv and install everything the tests and the demo need, from PyPI.
# Usage: deploy/install-python-deps.sh PYTHON VENV
set -euo pipefail
python=${1:-python3}
venv=${2:-.venv}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install --quiet --upgrade pip
echo "installing pd-operator with its test extras" >&2
$pip install --quiet -e '.[test]'
