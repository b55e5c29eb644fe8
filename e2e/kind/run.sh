#!/usr/bin/env bash
# make e2e-kind: the e2e suite against a kind cluster, on hosts with a Docker engine.
# Without Docker it says so in one line and exits 0 (these CI hosts have none; the suite runs
# there against the local control plane instead: `make e2e`). With Docker, any failure is an
# error. KEEP_CLUSTER=1 leaves the kind cluster running for inspection.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
  echo "e2e-kind: needs a Docker engine (none here); runs on hosts with Docker"
  exit 0
fi
# shellcheck source=devcluster/versions.env
source devcluster/versions.env
CACHE=${REMBG_FLEET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rembg-fleet}
PY=${PY:-.venv/bin/python}
make venv model binaries
kubectl=$CACHE/bin/kubernetes-$KUBERNETES_VERSION/kubectl

kind=$(command -v kind || true)
if [ -z "$kind" ]; then
  kind=$CACHE/bin/kind-$KIND_VERSION/kind
  if [ ! -x "$kind" ]; then
    echo "e2e-kind: building kind $KIND_VERSION"
    GOBIN=$(dirname "$kind") GOMODCACHE=$CACHE/go-mod GOCACHE=$CACHE/go-build CGO_ENABLED=0 \
      .venv/bin/go install "sigs.k8s.io/kind@$KIND_VERSION"
  fi
fi

name=rembg-e2e-$$
work=$(mktemp -d)
export KUBECONFIG=$work/kubeconfig
cleanup() {
  if [ "${KEEP_CLUSTER:-0}" = 1 ]; then
    echo "e2e-kind: kept cluster $name (KUBECONFIG=$KUBECONFIG); delete: $kind delete cluster --name $name"
  else
    "$kind" delete cluster --name "$name" >/dev/null 2>&1 || true
    rm -rf "$work"
  fi
}
trap cleanup EXIT

"$kind" create cluster --name "$name" --config e2e/kind/kind-config.yaml --kubeconfig "$KUBECONFIG" --wait 180s

# Locally built images go into the cluster's nodes, under the names the operator and chart use by
# default, so nothing is pulled for them. (The CUDA image is not built: kind nodes have no GPU.)
server_image=$("$PY" -c 'from rembg_operator.models import RembgServiceSpec as S; print(S.model_fields["image"].default)')
docker build -t rembg-fleet/server:dev -t "$server_image" -f inference_image/Dockerfile .
images=(rembg-fleet/server:dev "$server_image")
if [ -f operator/Dockerfile ]; then
  docker build -t rembg-fleet/operator:dev -f operator/Dockerfile .
  images+=(rembg-fleet/operator:dev)
fi
for image in "${images[@]}"; do
  "$kind" load docker-image "$image" --name "$name"
done

# Advertise 4 GPUs on each GPU worker (extended resource in node status; no device plugin).
for node in $("$kubectl" get nodes -l nvidia.com/gpu.present=true -o name); do
  "$kubectl" patch "$node" --subresource=status --type=json \
    -p '[{"op":"add","path":"/status/capacity/nvidia.com~1gpu","value":"4"}]'
done

# Prometheus Operator CRDs, as the local control plane installs them.
for crd in "$CACHE/bin/prometheus-operator-crds-$PROMETHEUS_OPERATOR_VERSION"/*.yaml; do
  "$kubectl" apply --server-side -f "$crd"
done
"$kubectl" wait --for=condition=Established --timeout=60s crd --all

REMBG_E2E_KUBECONFIG=$KUBECONFIG "$PY" -m pytest e2e -p no:cacheprovider "$@"
