#!/usr/bin/env bash
# Builds a kind node image without a registry, for the pinned Kubernetes version, cached by its
# inputs outside the clone: $CACHE/images/kind-node-<key12>.tar (a docker-archive `docker load`
# takes), described in build/kind-node.json. `make e2e-kind` uses it where kindest/node cannot
# be pulled.
#
# What kind's own node image has, built from here instead of its BuildKit Dockerfile (which
# clones from GitHub): a debootstrap Debian bookworm with systemd and kind's base files
# (entrypoint, systemd units, containerd config) from the sigs.k8s.io/kind module; Debian's
# containerd, runc and CNI plugins; crictl, kubeadm, kubelet and kubectl built from their Go
# modules (`make binaries`); and, preloaded in its containerd (content only, unpacked on first
# use, as `kind build node-image` does), the images kubeadm runs:
#   registry.k8s.io/kube-{apiserver,controller-manager,scheduler}  FROM scratch + our binary
#   registry.k8s.io/kube-proxy                                     + iptables, conntrack, ipset
#   registry.k8s.io/etcd:<etcd's version>-0                        FROM scratch + our etcd
#   registry.k8s.io/coredns/coredns                                our CoreDNS build
#   registry.k8s.io/pause:<k8s' pause tag>                         our pause (build-images.sh)
#   localhost/rembg-fleet/kind-cni                                 the CNI (devcluster/kind/)
# Differences from kind's image, each because of this machine: bookworm's systemd (kind's trixie
# one deprecates cgroup v1, which this host has); `restrict_oom_score_adj = true` (root here has
# no CAP_SYS_RESOURCE); our CNI instead of kindnetd, whose Go module the proxy refuses.
#
# Usage: devcluster/build-kind-node.sh   (root; after `make binaries images`)
set -Eeuo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=devcluster/versions.env
source "$here/versions.env"
CACHE=${REMBG_FLEET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rembg-fleet}
IMAGES=$CACHE/images
GO=${GO:-$root/.venv/bin/go}
PYTHON=${PYTHON:-$root/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
# Bump when the way the node image is built changes, so a cached one gets rebuilt.
RECIPE=1
SUITE=bookworm
# kind's base packages (images/base/Dockerfile), plus what Debian splits out: systemd-sysv (for
# /sbin/init) and the container runtime kind builds from source.
NODE_PACKAGES=systemd,systemd-sysv,dbus,conntrack,iptables,nftables,iproute2,ethtool,util-linux,mount,kmod,libseccomp2,pigz,fuse-overlayfs,e2fsprogs,bash,ca-certificates,curl,jq,procps,containerd,runc,containernetworking-plugins
# kube-proxy's and the CNI's image: what they run besides their own binary.
NET_PACKAGES=iptables,nftables,conntrack,iproute2,kmod,ipset,bash
NODE_REF=localhost/rembg-fleet/kind-node:$KUBERNETES_VERSION
CNI_REF=localhost/rembg-fleet/kind-cni:$KUBERNETES_VERSION
K8S_BIN=$CACHE/bin/kubernetes-$KUBERNETES_VERSION
KIND_BIN=$CACHE/bin/kind-$KIND_VERSION
COREDNS_BIN=$CACHE/bin/coredns-$COREDNS_VERSION

say() { echo "build-kind-node: $*" >&2; }
current_step="setup"
trap 'say "FAILED while building ${current_step} (see the output above); nothing was cached for it. Re-run: devcluster/build-kind-node.sh"' ERR

[ "$(id -u)" = 0 ] || { say "needs root (debootstrap, buildah with private storage, a private containerd)"; exit 1; }
need=()
for tool in buildah debootstrap containerd ctr jq setcap; do command -v "$tool" >/dev/null || need+=("$tool"); done
[ ${#need[@]} -eq 0 ] || { say "missing ${need[*]}: make system-deps"; exit 1; }
binaries=("$K8S_BIN"/{kubeadm,kubelet,kubectl,kube-apiserver,kube-controller-manager,kube-scheduler,kube-proxy,etcd} "$KIND_BIN/crictl" "$COREDNS_BIN/coredns")
for binary in "${binaries[@]}"; do
  [ -x "$binary" ] || { say "missing $binary: run \`make binaries\` first"; exit 1; }
done
pause_archive=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["images"]["pause"]["archive"])' "$root/build/images.json" 2>/dev/null || true)
[ -s "$pause_archive" ] || { say "no pause image in build/images.json: run \`make images\` first"; exit 1; }

mkdir -p "$IMAGES"
exec 9>"$IMAGES/.kind-node.lock"
if ! flock -n 9; then
  say "another build holds $IMAGES/.kind-node.lock; waiting for it"
  flock 9
fi
tmp=$(mktemp -d "$IMAGES/.kind-node.XXXXXX")
# shellcheck source=devcluster/image-lib.sh
source "$here/image-lib.sh"
ctrd_pid=
containers=()
preloaded=()  # the images committed on the way (set below), removed on exit
cleanup() {
  local c
  [ -n "$ctrd_pid" ] && kill "$ctrd_pid" 2>/dev/null && wait "$ctrd_pid" 2>/dev/null
  if [ -n "${DRIVER:-}" ]; then  # buildah was used (a build, not a cache hit)
    for c in "${containers[@]}"; do B rm "$c" >/dev/null 2>&1 || true; done
    # The images committed on the way: only the node image's archive is kept.
    for c in "${preloaded[@]}" localhost/rembg-fleet/kind-netbase:build "$NODE_REF"; do
      B rmi "$c" >/dev/null 2>&1 || true
    done
  fi
  remove_tree "$tmp"
}
trap cleanup EXIT
# Any temporary folder left behind (we hold the lock) is from a build that was killed.
for stale in "$IMAGES"/.kind-node.*; do [ -d "$stale" ] && [ "$stale" != "$tmp" ] && remove_tree "$stale"; done

kind_dir=$(GOMODCACHE=$CACHE/go-mod GOFLAGS=-mod=mod "$GO" mod download -json "sigs.k8s.io/kind@$KIND_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
kind_files=$kind_dir/images/base/files
[ -s "$kind_files/usr/local/bin/entrypoint" ] || { say "no kind base files in $kind_files"; exit 1; }
etcd_tag=$("$K8S_BIN/etcd" --version | sed -n 's/^etcd Version: //p')-0
pause_tag=$(sed -n 's/^TAG ?= //p' "$CACHE/go-mod/k8s.io/kubernetes@$KUBERNETES_VERSION/build/pause/Makefile")
[ -n "$pause_tag" ] || { say "no pause tag in k8s.io/kubernetes@$KUBERNETES_VERSION/build/pause/Makefile"; exit 1; }

key=$({
  echo "recipe=$RECIPE suite=$SUITE node=$NODE_PACKAGES net=$NET_PACKAGES kind=$KIND_VERSION etcd=$etcd_tag pause=$pause_tag"
  containerd --version
  sha256sum < "$here/build-kind-node.sh"; sha256sum < "$here/image-lib.sh"
  (cd "$here/kind" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
  (cd "$kind_files" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
  sha256sum "${binaries[@]}" "$pause_archive" | cut -d' ' -f1
} | sha256)
archive=$IMAGES/kind-node-${key:0:12}.tar
preloaded=(
  "registry.k8s.io/kube-apiserver:$KUBERNETES_VERSION" "registry.k8s.io/kube-controller-manager:$KUBERNETES_VERSION"
  "registry.k8s.io/kube-scheduler:$KUBERNETES_VERSION" "registry.k8s.io/kube-proxy:$KUBERNETES_VERSION"
  "registry.k8s.io/etcd:$etcd_tag" "registry.k8s.io/coredns/coredns:$COREDNS_VERSION"
  "registry.k8s.io/pause:$pause_tag" "$CNI_REF"
)

write_index() { # seconds cached
  mkdir -p "$root/build"
  "$PYTHON" - "$root/build/kind-node.json" "$NODE_REF" "$archive" "$key" "$1" "$2" "$CNI_REF" "${preloaded[@]}" <<'EOF'
import json, os, sys
path, ref, archive, key, seconds, cached, cni, *images = sys.argv[1:]
index = {"ref": ref, "archive": archive, "key": key, "size_bytes": os.path.getsize(archive),
         "build_seconds": int(seconds), "cached": cached == "true", "cni_image": cni, "preloaded": images}
with open(path + ".tmp", "w") as f:
    json.dump(index, f, indent=2)
os.replace(path + ".tmp", path)
EOF
}

if [ -s "$archive" ] && [ -s "$archive.json" ]; then
  write_index "$(sed -n 's/.*"build_seconds": \([0-9]*\).*/\1/p' "$archive.json")" true
  say "$NODE_REF: cached, $(mb "$(archive_size "$archive")") MB -> $archive"
  exit 0
fi
start=$SECONDS
pick_driver
mirror=$(debian_mirror)

# --- The node's root filesystem ------------------------------------------------------------------
current_step="the node's root filesystem (debootstrap $SUITE)"
node=$tmp/node
say "debootstrap --variant=minbase $SUITE from $mirror with kind's packages (cold: ~2 min)"
debootstrap --variant=minbase --include="$NODE_PACKAGES" "$SUITE" "$node" "$mirror" > "$tmp/debootstrap-node.log" 2>&1 \
  || { tail -n 30 "$tmp/debootstrap-node.log" >&2; say "debootstrap failed (log above)"; false; }
slim_rootfs "$node"
current_step="kind's base files"
install -m 0755 "$kind_files"/usr/local/bin/* "$node/usr/local/bin/"
install -d -m 0755 "$node/kind/bin" "$node/etc/containerd" "$node/etc/systemd/system/kubelet.service.d" \
  "$node/etc/kubernetes/manifests" "$node/opt/cni/bin"
install -m 0755 "$kind_files"/kind/bin/* "$node/kind/bin/"
install -m 0644 "$kind_files/etc/crictl.yaml" "$node/etc/"
install -m 0644 "$kind_files/etc/default/kubelet" "$node/etc/default/"
install -m 0644 "$kind_files"/etc/sysctl.d/* "$node/etc/sysctl.d/"
install -m 0644 "$kind_files"/etc/systemd/system/*.{service,slice} "$node/etc/systemd/system/"
install -m 0644 "$kind_files"/etc/systemd/system/kubelet.service.d/* "$node/etc/systemd/system/kubelet.service.d/"
# As kind's Dockerfile: no units but the node's own, journald without kmsg, systemd as init.
find "$node/lib/systemd/system/sysinit.target.wants/" -name systemd-tmpfiles-setup.service -delete
rm -f "$node"/lib/systemd/system/{multi-user,local-fs,basic}.target.wants/* "$node"/etc/systemd/system/*.wants/* \
  "$node"/lib/systemd/system/sockets.target.wants/*udev* "$node"/lib/systemd/system/sockets.target.wants/*initctl*
echo "ReadKMsg=no" >> "$node/etc/systemd/journald.conf"
chroot "$node" systemctl enable kubelet.service containerd.service undo-mount-hacks.service >/dev/null 2>&1
chroot "$node" systemctl mask systemd-binfmt.service >/dev/null 2>&1
# kind's units and scripts run the runtime from /usr/local (its own builds); Debian's are in /usr.
ln -s /usr/bin/containerd "$node/usr/local/bin/containerd"
ln -s /usr/bin/ctr "$node/usr/local/bin/ctr"
for plugin in host-local loopback ptp portmap; do cp "$node/usr/lib/cni/$plugin" "$node/opt/cni/bin/"; done
chroot "$node" ctr oci spec \
  | jq '.hooks.createContainer[.hooks.createContainer | length] |= . + {"path": "/kind/bin/mount-product-files.sh"}' \
  | jq 'del(.process.rlimits)' > "$node/etc/containerd/cri-base.json"
sed -e 's/^\(\s*restrict_oom_score_adj\s*=\s*\)false/\1true/' \
    -e "s|^\(\s*sandbox_image\s*=\s*\).*|\1\"registry.k8s.io/pause:$pause_tag\"|" \
    "$kind_files/etc/containerd/config.toml" > "$node/etc/containerd/config.toml"
grep -q '^\s*restrict_oom_score_adj = true' "$node/etc/containerd/config.toml" \
  || { say "kind's containerd config has no restrict_oom_score_adj to set"; false; }
install -m 0755 "$KIND_BIN/crictl" "$node/usr/local/bin/"
install -m 0755 "$K8S_BIN/kubeadm" "$K8S_BIN/kubelet" "$K8S_BIN/kubectl" "$node/usr/bin/"
echo "$KUBERNETES_VERSION" > "$node/kind/version"
chroot "$node" kubelet --version | grep -qx "Kubernetes $KUBERNETES_VERSION" || { say "the node's kubelet is not $KUBERNETES_VERSION"; false; }

# --- The images kubeadm runs ---------------------------------------------------------------------
current_step="kube-proxy's and the CNI's base (debootstrap $SUITE)"
net=$tmp/net
debootstrap --variant=minbase --include="$NET_PACKAGES" "$SUITE" "$net" "$mirror" > "$tmp/debootstrap-net.log" 2>&1 \
  || { tail -n 30 "$tmp/debootstrap-net.log" >&2; say "debootstrap failed (log above)"; false; }
slim_rootfs "$net"
tar --numeric-owner --xattrs -C "$net" -cf "$tmp/net.tar" .
remove_tree "$net"
mkdir -p "$tmp/images"
export_image() { # ctr ref: commit a working container and write its docker-archive
  local ctr=$1 ref=$2 file
  file=$tmp/images/$(echo "$ref" | tr '/:' '__').tar
  B commit --quiet --format docker --rm "$ctr" "$ref" >/dev/null
  B push --quiet "$ref" "docker-archive:$file:$ref"
}
from() { # image: a working container of it in $ctr, removed on exit whatever happens
  ctr=$(B from --pull=never "$1")
  containers+=("$ctr")
}
current_step="the control-plane images"
for component in kube-apiserver kube-controller-manager kube-scheduler etcd; do
  tag=$KUBERNETES_VERSION; [ "$component" = etcd ] && tag=$etcd_tag
  from scratch
  B copy "$ctr" "$K8S_BIN/$component" "/usr/local/bin/$component" >/dev/null
  B config --env PATH=/usr/local/bin:/usr/bin:/bin "$ctr"
  export_image "$ctr" "registry.k8s.io/$component:$tag"
done
current_step="the CoreDNS image"
# As upstream's image: a non-root user that binds port 53 through the binary's file capability.
mkdir -p "$tmp/coredns"
cp "$COREDNS_BIN/coredns" "$tmp/coredns/coredns"
setcap cap_net_bind_service=+ep "$tmp/coredns/coredns"
tar --xattrs --xattrs-include=security.capability -C "$tmp/coredns" -cf "$tmp/coredns.tar" coredns
from scratch
B add "$ctr" "$tmp/coredns.tar" / >/dev/null
B config --user 65532:65532 --entrypoint '["/coredns"]' "$ctr"
export_image "$ctr" "registry.k8s.io/coredns/coredns:$COREDNS_VERSION"
current_step="the kube-proxy and CNI images"
from scratch
B add "$ctr" "$tmp/net.tar" / >/dev/null
B config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
B commit --quiet --format docker --rm "$ctr" localhost/rembg-fleet/kind-netbase:build >/dev/null
from localhost/rembg-fleet/kind-netbase:build
B copy "$ctr" "$K8S_BIN/kube-proxy" /usr/local/bin/kube-proxy >/dev/null
export_image "$ctr" "registry.k8s.io/kube-proxy:$KUBERNETES_VERSION"
from localhost/rembg-fleet/kind-netbase:build
B copy "$ctr" "$K8S_BIN/kubectl" /usr/local/bin/kubectl >/dev/null
B copy --chmod 0755 "$ctr" "$here/kind/rembg-fleet-cni" /usr/local/bin/rembg-fleet-cni >/dev/null
B config --entrypoint '["/usr/local/bin/rembg-fleet-cni"]' "$ctr"
export_image "$ctr" "$CNI_REF"

# --- Preloaded: imported into the node's containerd store by a containerd of the same version --
current_step="preloading the images into the node's containerd"
node_containerd=$(chroot "$node" containerd --version | awk '{print $3}')
host_containerd=$(containerd --version | awk '{print $3}')
[ "$node_containerd" = "$host_containerd" ] \
  || { say "the node's containerd is $node_containerd, this host's $host_containerd: its store must be written by the same version"; false; }
mkdir -p "$tmp/ctrd"
cat > "$tmp/ctrd/config.toml" <<EOF
version = 2
root = "$node/var/lib/containerd"
state = "$tmp/ctrd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$tmp/ctrd/containerd.sock"
[ttrpc]
  address = "$tmp/ctrd/containerd.sock.ttrpc"
EOF
containerd --config "$tmp/ctrd/config.toml" > "$tmp/ctrd/log" 2>&1 &
ctrd_pid=$!
C() { ctr --address "$tmp/ctrd/containerd.sock" --namespace k8s.io "$@"; }
for _ in $(seq 1 50); do C version >/dev/null 2>&1 && break; sleep 0.2; done
# Content only (kind does the same): the node's containerd unpacks an image on first use.
for file in "$tmp"/images/*.tar "$pause_archive"; do
  C images import --label=io.cri-containerd.pinned=pinned --all-platforms --no-unpack "$file" >/dev/null
done
pause_ref=$(tar -xOf "$pause_archive" manifest.json | jq -r '.[0].RepoTags[0]')
C images tag "$pause_ref" "registry.k8s.io/pause:$pause_tag" >/dev/null
C images rm "$pause_ref" >/dev/null
C images label "registry.k8s.io/pause:$pause_tag" io.cri-containerd.pinned=pinned >/dev/null
have=$(C images ls -q)
for ref in "${preloaded[@]}"; do
  grep -qx "$ref" <<< "$have" || { say "$ref is not in the node's containerd store"; false; }
done
kill "$ctrd_pid"; wait "$ctrd_pid" 2>/dev/null || true; ctrd_pid=
rm -rf "$node/var/lib/containerd/tmpmounts" "$tmp/images" "$tmp/net.tar"

# --- The node image, as kind's: systemd as init under kind's entrypoint -------------------------
current_step="the node image $NODE_REF"
tar --numeric-owner --xattrs -C "$node" -cf "$tmp/node.tar" .
remove_tree "$node"
from scratch
B add "$ctr" "$tmp/node.tar" / >/dev/null
rm -f "$tmp/node.tar"
B config --env container=docker --stop-signal SIGRTMIN+3 \
  --entrypoint '["/usr/local/bin/entrypoint", "/sbin/init"]' --label io.rembg-fleet.key="$key" \
  --label org.opencontainers.image.description="kind node $KUBERNETES_VERSION (kind $KIND_VERSION base files, Debian $SUITE), built offline" "$ctr"
B commit --quiet --format docker --rm "$ctr" "$NODE_REF" >/dev/null
B push --quiet "$NODE_REF" "docker-archive:$tmp/kind-node.tar:$NODE_REF"
seconds=$((SECONDS - start))
printf '{"ref": "%s", "key": "%s", "build_seconds": %s, "built_at": "%s"}\n' "$NODE_REF" "$key" "$seconds" "$(date -u +%FT%TZ)" > "$tmp/kind-node.tar.json"
find "$IMAGES" -maxdepth 1 \( -name 'kind-node-????????????.tar' -o -name 'kind-node-????????????.tar.json' \) -delete
mv "$tmp/kind-node.tar.json" "$archive.json"
mv "$tmp/kind-node.tar" "$archive"
write_index "$seconds" false
trap - ERR
say "$NODE_REF built in ${seconds}s, $(mb "$(archive_size "$archive")") MB -> $archive"
