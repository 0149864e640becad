#!/usr/bin/env bash
# The main job (`make demo`): on the local cluster with its real node, from nothing to an answer.
#   1. offline validation of the examples (pdctl check)
#   2. the local control plane, fake GPU nodes and one real node (kubelet + containerd)
#   3. the operator and runtime images, built here from deploy/images/*.Dockerfile
#   4. `helm install` of charts/pd-operator (the operator runs in a pod) and `helm test`
#   5. a bad pair rejected at kubectl, naming the rule
#   6. SmolLM2 as P/D (builtin engine): pods really run, KVPathVerified, Ready
#   7. a chat completion through the router, and D's KV pull counter
# Everything is cached in ~/.cache/pd-operator; a second run takes a few minutes at most. The
# cluster keeps running; stop it (and undo its host changes) with
#   PD_DEV_CLUSTER_DIR=<printed dir> .venv/bin/pdctl dev cluster down
set -euo pipefail
cd "$(dirname "$0")/.."
PDCTL=.venv/bin/pdctl
export PD_DEV_CLUSTER_DIR=${PD_DEV_CLUSTER_DIR:-$HOME/.cache/pd-operator/clusters/demo}
NS=${PD_DEMO_NAMESPACE:-pd-demo}
RELEASE=demo  # not "pd-operator": that name is the local dev operator's webhook configuration
GOOD=deploy/examples/local/smollm2-realnode.yaml
BAD=deploy/examples/rejected/tp-not-divisible.yaml
START=$SECONDS
step() { printf '\n== [%3ds] %s\n' "$((SECONDS - START))" "$*"; }
tool() { .venv/bin/python -c "from pd_dev.devcluster.build import binary_path; print(binary_path('$1'))"; }

step "offline validation of every example (pdctl check)"
$PDCTL check deploy/examples/accepted/*.yaml deploy/examples/local/*.yaml >/dev/null \
  && echo "all accepted and local examples pass"
if $PDCTL check "$BAD" >/dev/null; then echo "expected $BAD to be rejected" >&2; exit 1; fi

step "local cluster with a real node in $PD_DEV_CLUSTER_DIR (builds on first use: minutes)"
$PDCTL dev cluster up --real-node
KUBECONFIG=$($PDCTL dev cluster kubeconfig); export KUBECONFIG
KUBECTL=$(tool kubectl); HELM=$(tool helm)
$KUBECTL get nodes -L pd-operator.dev/real-node -L nvidia.com/gpu.product

step "images from deploy/images (cached by content; first build downloads torch: minutes)"
$PDCTL dev images build

step "helm install $RELEASE (the operator and its webhook run in a pod on the real node)"
CRD=pddeployments.serving.pd-operator.dev
CRD_VALUES=()
if $KUBECTL get crd "$CRD" >/dev/null 2>&1 && [ "$($KUBECTL get crd "$CRD" \
     -o jsonpath='{.metadata.annotations.meta\.helm\.sh/release-name}')" != "$RELEASE" ]; then
  # made outside this release (tests, kubectl): keep it, at this tree's version
  echo "the CRD exists outside the release: applying crds/ and installing with crds.enabled=false"
  $KUBECTL apply --server-side --force-conflicts -f crds/pddeployment.yaml >/dev/null
  CRD_VALUES=(--set crds.enabled=false)
fi
$HELM upgrade --install "$RELEASE" charts/pd-operator -n pd-operator --create-namespace \
  -f charts/pd-operator/ci/realnode-values.yaml "${CRD_VALUES[@]}" --wait --timeout 5m
$KUBECTL get pods -n pd-operator -o wide
step "helm test (a known-bad PDDeployment must be refused by the webhook, by rule id)"
$HELM test "$RELEASE" -n pd-operator --timeout 3m

step "a bad pair is rejected at admission"
$KUBECTL create namespace "$NS" --dry-run=client -o yaml | $KUBECTL apply -f - >/dev/null
if $KUBECTL apply -n "$NS" -f "$BAD"; then echo "expected a rejection" >&2; exit 1; fi

step "SmolLM2 as P/D: admitted, pods run, the KV path is proven"
$KUBECTL apply -n "$NS" -f "$GOOD"
NAME=$($KUBECTL create --dry-run=client -f "$GOOD" -o jsonpath='{.metadata.name}')
for _ in $(seq 120); do
  PHASE=$($KUBECTL get -n "$NS" "pdd/$NAME" -o jsonpath='{.status.phase}' 2>/dev/null || true)
  [ "$PHASE" = Ready ] && break
  printf '  [%3ds] phase=%s  %s\n' "$((SECONDS - START))" "${PHASE:-?}" \
    "$($KUBECTL get pods -n "$NS" -l app.kubernetes.io/instance="$NAME" --no-headers \
       -o custom-columns=POD:.metadata.name,STATUS:.status.phase 2>/dev/null | tr '\n' ' ')"
  sleep 5
done
if [ "$PHASE" != Ready ]; then
  $KUBECTL describe -n "$NS" "pdd/$NAME" >&2; exit 1
fi
$KUBECTL get -n "$NS" pdd,pods -o wide
echo "KVPathVerified: $($KUBECTL get -n "$NS" "pdd/$NAME" \
  -o jsonpath='{.status.conditions[?(@.type=="KVPathVerified")].message}')"

step "a chat completion through the router Service"
ROUTER=$($KUBECTL get -n "$NS" "svc/$NAME-router" -o jsonpath='{.spec.clusterIP}')
MODEL=$($KUBECTL get -n "$NS" "pdd/$NAME" -o jsonpath='{.spec.model.name}')
BODY='{"model":"'$MODEL'","messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":24,"temperature":0}'
ANSWER=""
for _ in $(seq 30); do  # the router discovers the pods a few seconds after they are Ready
  ANSWER=$(curl -s -m 120 -H 'content-type: application/json' -d "$BODY" \
    "http://$ROUTER:8000/v1/chat/completions" || true)
  case "$ANSWER" in *'"content"'*) break ;; esac
  sleep 2
done
.venv/bin/python - "$ANSWER" <<'EOF'
import json, sys
reply = json.loads(sys.argv[1])
print("Q: What is the capital of France?")
print("A:", reply["choices"][0]["message"]["content"])
EOF
DECODE_IP=$($KUBECTL get pods -n "$NS" -l "app.kubernetes.io/instance=$NAME,serving.pd-operator.dev/role=decode" \
  -o jsonpath='{.items[0].status.podIP}')
curl -s "http://$DECODE_IP:8000/metrics" | grep '^pd_runtime_kv_pulls_total' || true

step "done in $((SECONDS - START)) s; where to look next"
cat <<EOF
  export PD_DEV_CLUSTER_DIR=$PD_DEV_CLUSTER_DIR KUBECONFIG=$KUBECONFIG
  $KUBECTL get pdd -n $NS -o wide              # phase, conditions (KVPathVerified)
  $KUBECTL describe pdd/$NAME -n $NS           # Events: created children, the KV path check
  $KUBECTL logs -n $NS $NAME-decode-0          # the decode engine (pulls, TTFT)
  $KUBECTL logs -n pd-operator deploy/$RELEASE-pd-operator # the operator
  curl http://$ROUTER:8000/v1/models           # the router (OpenAI API)
  $KUBECTL apply -n $NS -f deploy/examples/local/smollm2-realnode-p1-d3.yaml   # P TP 1 -> D TP 3
  docs/real-node.md, docs/images.md, docs/operator.md
  stop it all: $PDCTL dev cluster down
EOF
