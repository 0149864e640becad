#!/usr/bin/env bash
# The main job (`make demo`): validate the examples offline, start the local control plane with
# fake GPU nodes, run the operator with its webhook on this host, deploy one PDDeployment until it
# is Ready, and show a bad pair rejected at kubectl. Leaves the cluster running; stop it with
#   .venv/bin/pdctl dev cluster down
set -euo pipefail
cd "$(dirname "$0")/.."
PDCTL=.venv/bin/pdctl
GOOD=deploy/examples/accepted/llama-3.1-8b-basic.yaml
BAD=deploy/examples/rejected/tp-not-divisible.yaml
step() { printf '\n== %s\n' "$*"; }

step "offline validation of every example (pdctl check)"
$PDCTL check deploy/examples/accepted/*.yaml >/dev/null && echo "all accepted examples pass"
if $PDCTL check "$BAD"; then echo "expected $BAD to be rejected" >&2; exit 1; fi

step "local control plane (builds on first use; minutes)"
$PDCTL dev cluster up
KUBECONFIG=$($PDCTL dev cluster kubeconfig); export KUBECONFIG
KUBECTL=$(.venv/bin/python -c 'from pd_dev.devcluster.build import binary_path; print(binary_path("kubectl"))')
$KUBECTL get nodes -L nvidia.com/gpu.product

step "CRD"
$KUBECTL apply --server-side -f crds/pddeployment.yaml
$KUBECTL wait --for=condition=Established crd/pddeployments.serving.pd-operator.dev --timeout=60s

step "operator with its webhook on 127.0.0.1"
NS=pd-demo
$KUBECTL create namespace "$NS" --dry-run=client -o yaml | $KUBECTL apply -f -
LOG=$(mktemp /tmp/pd-operator-demo.XXXX.log)
$PDCTL operator run --local-webhook --no-leader-election --metrics-port 0 -n "$NS" >"$LOG" 2>&1 &
OPERATOR=$!
trap 'kill $OPERATOR 2>/dev/null; wait $OPERATOR 2>/dev/null || true' EXIT
for _ in $(seq 60); do
  $KUBECTL get validatingwebhookconfigurations -o name 2>/dev/null | grep -q pd-operator && break
  sleep 1
done
echo "operator log: $LOG"

step "a bad pair is rejected at admission"
if $KUBECTL apply -n "$NS" -f "$BAD"; then echo "expected a rejection" >&2; exit 1; fi

step "a good pair is admitted and launched"
$KUBECTL apply -n "$NS" -f "$GOOD"
NAME=$($KUBECTL get -n "$NS" -f "$GOOD" -o jsonpath='{.metadata.name}')
$KUBECTL wait -n "$NS" "pdd/$NAME" --for=jsonpath='{.status.phase}'=Ready --timeout=180s
$KUBECTL get -n "$NS" pdd -o wide
$KUBECTL get -n "$NS" pods -o wide
echo
echo "done: the cluster keeps running (KUBECONFIG=$KUBECONFIG); stop it with: $PDCTL dev cluster down"
