# pd-operator: the two commands of the README, and their parts.
#   make demo   - the main job: the local cluster with its real node, the images, helm install of
#                 the chart, a rejected pair, SmolLM2 served as P/D, a completion via the router
#   make test   - lint (ruff, mypy, import contracts), then every test tier that runs without a
#                 GPU (unit, runtime over NIXL on CPU, the real control plane, the builtin engine
#                 behind vllm-router, live vLLM, the real node: root); GPU tests skip
# Both do their own setup on a fresh machine (Python venv, Go-built control plane, cached).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv cluster-binaries live-vllm test test-unit lint demo clean-venv generate check-generated

$(STAMP): pyproject.toml deploy/install-python-deps.sh
	bash deploy/install-python-deps.sh $(PYTHON) $(VENV)
	touch $(STAMP)

venv: $(STAMP)

## Build (or reuse from ~/.cache/pd-operator) etcd, kube-*, kubectl, kwok and helm; as root also
## the real node's kubelet, kube-proxy and CoreDNS.
cluster-binaries: venv
	$(BIN)/pdctl dev cluster build

## Rewrite every file generated from code (CRD, chart values and templates, compatibility docs).
generate: venv
	$(BIN)/python -m pd_dev.generate

## Fail when a committed generated file differs from what `make generate` would write.
check-generated: venv
	$(BIN)/python -m pd_dev.generate --check

## Install (or reuse from ~/.cache/pd-operator/live-vllm) real vLLM 0.32.0 (CPU), NIXL and
## vllm-router for the live tier (tests/live) and `pdctl run` with engine.type: vllm.
live-vllm: venv
	bash deploy/live-vllm.sh $(VENV)

test-unit: venv
	$(BIN)/python -m pytest tests/unit -q

## ruff (whole tree), mypy (the product packages), the import contracts in .importlinter.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

## The setup steps run side by side (-j3): on a cold machine the Go builds are CPU-bound and
## the live-vLLM install mostly waits on downloads. -Oline keeps each output line whole.
test: venv
	$(MAKE) --no-print-directory -j3 -Oline lint check-generated cluster-binaries live-vllm
	$(BIN)/python -m pytest tests -q

demo: venv cluster-binaries
	bash deploy/demo.sh

clean-venv:
	rm -rf $(VENV)
