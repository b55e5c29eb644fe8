#!/usr/bin/env bash
# Builds the images a node runs, each exported as a docker-archive tarball that containerd
# imports with `ctr -n k8s.io images import FILE`, cached by their inputs outside the clone:
#   ghcr.io/rembg-fleet/server:<version>    inference_image/Dockerfile (CPU; u2netp.onnx baked in)
#   ghcr.io/rembg-fleet/operator:<version>  operator/Dockerfile
#   localhost/rembg-fleet/pause:3.10        the pod sandbox: pause.c from the k8s.io/kubernetes
#                                           module, gcc -static, FROM scratch
# and, for the monitoring e2e test, FROM scratch around the static binaries build-binaries.sh
# made (so `make binaries` comes first): localhost/rembg-fleet/prometheus-operator, .../prometheus,
# .../prometheus-config-reloader, .../kube-state-metrics; for the KEDA e2e test, .../keda and
# .../keda-metrics-apiserver; and localhost/rembg-fleet/server-broken-model (the server
# image plus a model that yields empty masks, for the canary test).
# Usage: devcluster/build-images.sh   (`make images`; needs root without a Docker engine)
#        REMBG_FLEET_BUILD_CUDA=1 also builds <server>-cuda from Dockerfile.cuda (Docker only)
#
# Where a Docker engine answers (`docker info`), it builds with `docker build` (BuildKit) from the
# Dockerfiles' default python:3.11-slim-bookworm. Elsewhere it needs no daemon and no registry:
# buildah (private storage under $CACHE/buildah) builds the same Dockerfiles on a base made by
# debootstrap from the Debian mirror apt uses (localhost/rembg-fleet/python-base:3.11-bookworm;
# bookworm's python3 is 3.11, like the slim image's).
#
# Each archive is $CACHE/images/<name>-<key12>.tar, the key a sha256 over everything that goes
# into the image (Dockerfile, the files it copies, the base's key, RECIPE); an archive that exists
# is not rebuilt, and older archives of the same name are deleted. A failed build or smoke test
# publishes nothing. build/images.json (repository root) lists ref, archive, key, size and build
# seconds of each image for whoever imports them into a node. pip inside the build trusts the
# host's CA bundle ($PIP_CERT, else $SSL_CERT_FILE, else Debian's), passed as the build secret
# `ca-bundle`; the final images are checked to hold no copy of it.
# A lock serialises concurrent runs (several checkouts may share one cache).
set -Eeuo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=devcluster/versions.env
source "$here/versions.env"
CACHE=${REMBG_FLEET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rembg-fleet}
IMAGES=$CACHE/images
# Bump when the way an image is built changes, so cached archives get rebuilt.
RECIPE=1
BASE_RECIPE=1  # the debootstrap base (its tarball and image)
SUITE=bookworm
BASE_PACKAGES=python3,python3-venv,python-is-python3
BASE_REF=localhost/rembg-fleet/python-base:3.11-bookworm
PAUSE_REF=localhost/rembg-fleet/pause:3.10
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/pyproject.toml" | head -n1)
SERVER_REF=ghcr.io/rembg-fleet/server:$version
OPERATOR_REF=ghcr.io/rembg-fleet/operator:$version
# 1: only the images that need no Go binary (base, server, operator, pause, broken model), so
# they can build while build-binaries.sh still runs (`make test` does that); the next full run
# finds them cached and writes build/images.json.
PYTHON_ONLY=${REMBG_FLEET_IMAGES_PYTHON_ONLY:-0}
CA_BUNDLE=${REMBG_FLEET_CA_BUNDLE:-${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}}
PYTHON=${PYTHON:-$root/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
GO=${GO:-$root/.venv/bin/go}
# shellcheck source=devcluster/image-lib.sh
source "$here/image-lib.sh"

say() { echo "build-images: $*" >&2; }
current_step="setup"
trap 'say "FAILED while building ${current_step} (see the output above); nothing was cached for it. Re-run: devcluster/build-images.sh"' ERR

if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  engine=docker
else
  engine=buildah
  [ "$(id -u)" = 0 ] || { say "without a Docker engine this needs root (debootstrap, buildah with private storage)"; exit 1; }
  need=()
  for tool in buildah debootstrap gcc; do command -v "$tool" >/dev/null || need+=("$tool"); done
  if [ ${#need[@]} -gt 0 ]; then
    say "missing ${need[*]}: apt-get install -y buildah debootstrap gcc"; exit 1
  fi
fi
[ -n "$version" ] || { say "no version in pyproject.toml"; exit 1; }

mkdir -p "$IMAGES"
exec 9>"$IMAGES/.build.lock"
if ! flock -n 9; then
  say "another build holds $IMAGES/.build.lock; waiting for it"
  flock 9
fi
# Holding the lock, any temporary folder left behind is from a build that was killed.
for stale in "$IMAGES"/.tmp.*; do [ -d "$stale" ] && remove_tree "$stale"; done
tmp=$(mktemp -d "$IMAGES/.tmp.XXXXXX")
containers=()  # buildah working containers to remove on exit, whatever happens
cleanup() {
  local c
  for c in "${containers[@]}"; do B rm "$c" >/dev/null 2>&1 || true; done
  remove_tree "$tmp"
}
trap cleanup EXIT

hash_inputs() { # paths relative to the repository root -> one sha256 over names and contents
  # Files on disk, tracked or not (what COPY copies), minus bytecode (.dockerignore drops it too).
  (cd "$root" && find "$@" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 \
    | LC_ALL=C sort -z | xargs -0 sha256sum) | sha256
}

label_of() { # image label -> value, empty when the image or label is absent
  B inspect --type image --format "{{index .OCIv1.Config.Labels \"$2\"}}" "$1" 2>/dev/null || true
}

# --- The base: debootstrap minbase + python3, made into an image FROM scratch ------------------
base_key=$(printf 'recipe=%s suite=%s packages=%s arch=%s\n' "$BASE_RECIPE" "$SUITE" "$BASE_PACKAGES" \
  "$(dpkg --print-architecture 2>/dev/null || uname -m)" | sha256)

ensure_base() { # builds or imports localhost/rembg-fleet/python-base once per run
  [ "${base_ready:-}" = 1 ] && return 0
  current_step="the base image $BASE_REF"
  local rootfs_tar=$IMAGES/python-base-rootfs-${base_key:0:12}.tar start=$SECONDS
  if [ "$(label_of "$BASE_REF" io.rembg-fleet.key)" = "$base_key" ]; then
    base_ready=1; return 0
  fi
  if [ ! -s "$rootfs_tar" ]; then
    local mirror dir=$tmp/rootfs
    mirror=$(debian_mirror)
    say "debootstrap --variant=minbase $SUITE from $mirror (cold: ~90 s)"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$dir" "$mirror" > "$tmp/debootstrap.log" 2>&1 \
      || { tail -n 30 "$tmp/debootstrap.log" >&2; say "debootstrap failed (log above)"; false; }
    slim_rootfs "$dir"
    local tool
    for tool in usr/sbin/groupadd usr/sbin/useradd usr/bin/python3 usr/bin/python; do
      [ -x "$dir/$tool" ] || { say "the base has no /$tool"; false; }
    done
    chroot "$dir" python -c 'import ensurepip, venv, ssl, sqlite3' || { say "the base's python lacks venv/ensurepip/ssl"; false; }
    tar --numeric-owner --xattrs -C "$dir" -cf "$tmp/rootfs.tar" .
    remove_tree "$dir"
    find "$IMAGES" -maxdepth 1 -name 'python-base-rootfs-????????????.tar' ! -name "${rootfs_tar##*/}" -delete
    mv "$tmp/rootfs.tar" "$rootfs_tar"
    say "base tarball $(mb "$(archive_size "$rootfs_tar")") MB in $((SECONDS - start))s -> $rootfs_tar"
  fi
  local ctr
  ctr=$(B from --name "rembg-fleet-base-$$" scratch); containers+=("$ctr")
  B add --quiet "$ctr" "$rootfs_tar" / >/dev/null
  B config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
    --cmd python3 --label io.rembg-fleet.key="$base_key" \
    --label org.opencontainers.image.description="Debian $SUITE minbase + $BASE_PACKAGES (debootstrap)" "$ctr"
  B commit --quiet --format docker --rm "$ctr" "$BASE_REF" >/dev/null
  say "base image $BASE_REF ready in $((SECONDS - start))s"
  base_ready=1
}

# --- Checks on a built image ---------------------------------------------------------------------
check_no_ca_copy() { # archive: fail when any layer holds /run/secrets content or the CA bundle
  [ -s "$CA_BUNDLE" ] || return 0
  "$PYTHON" - "$1" "$CA_BUNDLE" <<'EOF'
import hashlib, io, sys, tarfile
archive, bundle = sys.argv[1], open(sys.argv[2], "rb").read()
want, size, found = hashlib.sha256(bundle).hexdigest(), len(bundle), []
with tarfile.open(archive) as outer:
    for layer in (m for m in outer.getmembers() if m.isfile() and m.name.endswith(".tar")):
        with tarfile.open(fileobj=outer.extractfile(layer)) as inner:
            for m in inner:
                name = m.name.lstrip("./")
                if name.startswith("run/secrets/") or "ca-bundle" in name:
                    found.append(f"{layer.name}: {name}")
                elif m.isfile() and m.size == size:
                    if hashlib.sha256(inner.extractfile(m).read()).hexdigest() == want:
                        found.append(f"{layer.name}: {name} (a copy of the CA bundle)")
if found:
    sys.exit("the image holds the build's CA secret:\n  " + "\n  ".join(found))
EOF
  say "${1##*/}: no layer holds /run/secrets or a copy of $CA_BUNDLE"
}

smoke_cmd() { # name -> the command (one argument a line) that proves the image runs, as its user
  case $1 in
    pause) printf '%s\n' /pause -v;;
    operator) printf '%s\n' python -c 'import os, kopf, rembg_operator; print("operator: uid", os.getuid(), "kopf", getattr(kopf, "__version__", "?"), rembg_operator.__file__)';;
    prometheus-operator|prometheus|prometheus-config-reloader) printf '%s\n' "/bin/$1" --version;;
    kube-state-metrics) printf '%s\n' /bin/kube-state-metrics version;;
    keda) printf '%s\n' /keda --help;;
    keda-metrics-apiserver) printf '%s\n' /keda-adapter --help;;
    server-broken-model) printf '%s\n' python -c 'import os; assert os.path.getsize("/models-broken/u2netp.onnx") > 0; print("broken model in place")';;
    server) printf '%s\n' python -c 'import os, sys, rembg_server, rembg_server.app, onnxruntime; assert "site-packages" in rembg_server.__file__, rembg_server.__file__; assert os.path.getsize("/models/u2netp.onnx") > 4_000_000; print("server: uid", os.getuid(), "onnxruntime", onnxruntime.__version__, "python", sys.version.split()[0], rembg_server.__file__)';;
  esac
}

smoke_buildah() { # name ref: run the image without a daemon, as the user it names, with no network
  local name=$1 ref=$2 ctr cmd
  mapfile -t cmd < <(smoke_cmd "$name")
  ctr=$(B from --pull=never --name "rembg-fleet-smoke-$name-$$" "$ref"); containers+=("$ctr")
  B run --network none "$ctr" -- "${cmd[@]}"
  if [ "$name" = server ]; then serve_read_only "$ctr"; fi
  say "$name: entrypoint $(B inspect --type image --format '{{.OCIv1.Config.Entrypoint}} user {{.OCIv1.Config.User}}' "$ref")"
  B rm "$ctr" >/dev/null
}

serve_read_only() { # ctr: the server on a read-only root (tmpfs /tmp) in its own netns until /readyz
  local ctr=$1 mnt id=rembg-fleet-smoke-$$ bundle=$tmp/runc rr=$RUNROOT/runc pid ok=0 i
  mnt=$(B mount "$ctr")
  mkdir -p "$bundle"
  B inspect --type container "$ctr" > "$bundle/inspect.json"
  "$PYTHON" - "$bundle" "$mnt" <<'EOF'
import json, sys
bundle, rootfs = sys.argv[1:]
image = json.load(open(f"{bundle}/inspect.json"))["OCIv1"]["config"]
uid, _, gid = image["User"].partition(":")
spec = {
    "ociVersion": "1.0.2",
    "process": {
        "terminal": False, "cwd": image.get("WorkingDir") or "/",
        "user": {"uid": int(uid), "gid": int(gid or uid)},
        "args": image["Entrypoint"] + (image.get("Cmd") or []),
        "env": image["Env"] + ["REMBG_WARMUP_RUNS=1", "REMBG_LOG_FORMAT=text"],
        "noNewPrivileges": True,
        "capabilities": {k: [] for k in ("bounding", "effective", "permitted", "inheritable", "ambient")},
    },
    "root": {"path": rootfs, "readonly": True},
    "hostname": "smoke",
    "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777", "size=256m"]},
    ],
    "linux": {"namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
              "maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware"],
              "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"]},
}
json.dump(spec, open(f"{bundle}/config.json", "w"), indent=1)
EOF
  runc --root "$rr" run -d --bundle "$bundle" --pid-file "$bundle/pid" "$id" > "$tmp/serve.log" 2>&1 < /dev/null
  pid=$(cat "$bundle/pid")
  nsenter -t "$pid" -n ip link set lo up
  for i in $(seq 1 90); do
    if nsenter -t "$pid" -n "$PYTHON" -c 'import sys, urllib.request; sys.exit(0 if urllib.request.urlopen("http://127.0.0.1:8080/readyz", timeout=2).status == 200 else 1)' 2>/dev/null; then
      ok=1; break
    fi
    runc --root "$rr" state "$id" 2>/dev/null | grep -q '"status": "running"' || break
    sleep 1
  done
  runc --root "$rr" kill "$id" KILL >/dev/null 2>&1 || true
  for i in $(seq 1 20); do runc --root "$rr" state "$id" 2>/dev/null | grep -q '"status": "running"' || break; sleep 0.5; done
  runc --root "$rr" delete -f "$id" >/dev/null 2>&1 || true
  B umount "$ctr" >/dev/null
  if [ "$ok" != 1 ]; then
    tail -n 30 "$tmp/serve.log" >&2
    say "the server never became ready on a read-only root filesystem (log above)"; false
  fi
  say "server: ready on a read-only root (writable: a tmpfs /tmp only) after ${i}s, uid $(sed -n 's/.*"uid": \([0-9]*\).*/\1/p' "$bundle/config.json" | head -n1)"
}

# --- Build, check, export one image -------------------------------------------------------------
declare -A result_archive result_key result_seconds result_cached result_size

build_image() { # name ref key context dockerfile [extra build args...]
  local name=$1 ref=$2 key=$3 context=$4 dockerfile=$5; shift 5
  local archive=$IMAGES/$name-${key:0:12}.tar start=$SECONDS seconds cached=true
  current_step="$name ($ref)"
  if [ -s "$archive" ] && [ -s "$archive.json" ]; then
    seconds=$(sed -n 's/.*"build_seconds": \([0-9]*\).*/\1/p' "$archive.json")
  else
    cached=false
    say "building $ref from ${dockerfile#"$root"/}"
    local secret=() cmd=()
    [ -s "$CA_BUNDLE" ] && secret=(--secret "id=ca-bundle,src=$CA_BUNDLE")
    if [ "$engine" = docker ]; then
      DOCKER_BUILDKIT=1 docker build "${secret[@]}" -t "$ref" -f "$dockerfile" "$@" "$context"
      mapfile -t cmd < <(smoke_cmd "$name")
      docker run --rm --network none --read-only --tmpfs /tmp --entrypoint "${cmd[0]}" "$ref" "${cmd[@]:1}"
      docker save -o "$tmp/$name.tar" "$ref"
    else
      B bud --layers --force-rm --pull=never --network host --format docker --quiet=false "${secret[@]}" \
        -t "$ref" -f "$dockerfile" "$@" "$context"
      smoke_buildah "$name" "$ref"
      rm -f "$tmp/$name.tar"
      B push --quiet "$ref" "docker-archive:$tmp/$name.tar:$ref"
    fi
    check_no_ca_copy "$tmp/$name.tar"
    seconds=$((SECONDS - start))
    printf '{"ref": "%s", "key": "%s", "build_seconds": %s, "built_at": "%s", "engine": "%s"}\n' \
      "$ref" "$key" "$seconds" "$(date -u +%FT%TZ)" "$engine" > "$tmp/$name.tar.json"
    find "$IMAGES" -maxdepth 1 \( -name "$name-????????????.tar" -o -name "$name-????????????.tar.json" \) \
      ! -name "${archive##*/}" ! -name "${archive##*/}.json" -delete
    mv "$tmp/$name.tar.json" "$archive.json"
    mv "$tmp/$name.tar" "$archive"
  fi
  result_archive[$name]=$archive result_key[$name]=$key result_seconds[$name]=${seconds:-0}
  result_cached[$name]=$cached result_size[$name]=$(archive_size "$archive")
  say "$name: $( [ "$cached" = true ] && echo "cached (built in ${seconds:-?}s)" || echo "built in ${seconds}s" ), $(mb "${result_size[$name]}") MB -> $archive"
}

[ "$engine" = buildah ] && pick_driver
say "engine: $engine$( [ "$engine" = buildah ] && echo " (storage $STORE, driver $DRIVER)" )"
[ -s "$CA_BUNDLE" ] || say "no CA bundle at $CA_BUNDLE: pip in the builds uses its own (certifi)"

# The base that the Dockerfiles' PYTHON_IMAGE names: the debootstrap one here, the registry's
# python:3.11-slim-bookworm where Docker builds (it pulls).
if [ "$engine" = buildah ]; then
  base_args=(--build-arg "PYTHON_IMAGE=$BASE_REF")
  base_id=$base_key
else
  base_args=()
  base_id=docker:$(sed -n 's/^ARG PYTHON_IMAGE=//p' "$root/inference_image/Dockerfile")
fi
image_key() { # dockerfile inputs... -> key
  { echo "recipe=$RECIPE engine=$engine base=$base_id"; hash_inputs "$@"; } | sha256
}

server_key=$(image_key inference_image/Dockerfile .dockerignore pyproject.toml README.md inference_image/rembg_server)
operator_key=$(image_key operator/Dockerfile .dockerignore pyproject.toml README.md operator/rembg_operator)
for pair in "server:$server_key" "operator:$operator_key"; do
  name=${pair%%:*} key=${pair#*:}
  if [ ! -s "$IMAGES/$name-${key:0:12}.tar" ] && [ "$engine" = buildah ]; then ensure_base; fi
done
build_image server "$SERVER_REF" "$server_key" "$root" "$root/inference_image/Dockerfile" "${base_args[@]}"
build_image operator "$OPERATOR_REF" "$operator_key" "$root" "$root/operator/Dockerfile" "${base_args[@]}"
# The CUDA server (inference_image/Dockerfile.cuda) starts FROM nvidia/cuda, which only a registry
# has: opt-in, Docker only, tagged but not exported or cached here.
if [ "${REMBG_FLEET_BUILD_CUDA:-0}" = 1 ]; then
  current_step="server CUDA ($SERVER_REF-cuda)"
  if [ "$engine" = docker ]; then
    cuda_secret=()
    [ -s "$CA_BUNDLE" ] && cuda_secret=(--secret "id=ca-bundle,src=$CA_BUNDLE")
    DOCKER_BUILDKIT=1 docker build "${cuda_secret[@]}" -t "$SERVER_REF-cuda" -f "$root/inference_image/Dockerfile.cuda" "$root"
  else
    say "REMBG_FLEET_BUILD_CUDA=1: not built, its base nvidia/cuda needs a registry and a Docker engine"
  fi
fi

# --- The pause image: pause.c from the k8s.io/kubernetes module, static, FROM scratch ----------
current_step="the pause image"
pause_dir=${GOMODCACHE:-$CACHE/go-mod}/k8s.io/kubernetes@$KUBERNETES_VERSION/build/pause
if [ ! -s "$pause_dir/linux/pause.c" ]; then
  say "fetching k8s.io/kubernetes@$KUBERNETES_VERSION for pause.c"
  [ -x "$GO" ] || { say "no Go toolchain at $GO; run \`make venv\`"; false; }
  pause_dir=$(GOMODCACHE=${GOMODCACHE:-$CACHE/go-mod} GOFLAGS=-mod=mod "$GO" mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" \
    | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')/build/pause
fi
pause_tag=$(sed -n 's/^TAG ?= //p' "$pause_dir/Makefile")
pause_cflags="-Os -Wall -Werror -static -s -DVERSION=v${pause_tag:-3.10}-rembg-fleet"
pause_dockerfile='FROM scratch
COPY pause /pause
USER 65535:65535
ENTRYPOINT ["/pause"]'
pause_key=$({ echo "recipe=$RECIPE engine=$engine cflags=$pause_cflags gcc=$(gcc -dumpfullversion 2>/dev/null || echo none)"
  echo "$pause_dockerfile"; sha256sum < "$pause_dir/linux/pause.c"; } | sha256)
if [ ! -s "$IMAGES/pause-${pause_key:0:12}.tar" ]; then
  mkdir -p "$tmp/pause"
  # shellcheck disable=SC2086
  gcc $pause_cflags -o "$tmp/pause/pause" "$pause_dir/linux/pause.c"
  echo "$pause_dockerfile" > "$tmp/pause/Dockerfile"
fi
build_image pause "$PAUSE_REF" "$pause_key" "$tmp/pause" "$tmp/pause/Dockerfile"

# --- Monitoring: the Prometheus Operator, Prometheus, its config reloader, kube-state-metrics ----
# The static Go binaries build-binaries.sh built (`make binaries` first), each FROM scratch as an
# unprivileged user, for the Prometheus Operator's pods (devcluster/rembg_devcluster/monitoring.py).
# The Go module's v0.315.1 is Prometheus 3.15.1 (v0.305.0 would be 3.5.0).
IFS=. read -r prom_minor prom_patch <<< "${PROMETHEUS_VERSION#v0.}"
prom_ver=v3.$((10#${prom_minor#3})).$prom_patch
declare -A go_image_ref=(
  [prometheus-operator]=localhost/rembg-fleet/prometheus-operator:$PROMETHEUS_OPERATOR_VERSION
  [prometheus]=localhost/rembg-fleet/prometheus:$prom_ver
  [prometheus-config-reloader]=localhost/rembg-fleet/prometheus-config-reloader:$PROMETHEUS_OPERATOR_VERSION
  [kube-state-metrics]=localhost/rembg-fleet/kube-state-metrics:$KUBE_STATE_METRICS_VERSION
  [keda]=localhost/rembg-fleet/keda:$KEDA_VERSION
  [keda-metrics-apiserver]=localhost/rembg-fleet/keda-metrics-apiserver:$KEDA_VERSION
)
declare -A go_image_binary=(
  [prometheus-operator]=$CACHE/bin/prometheus-operator-$PROMETHEUS_OPERATOR_VERSION/operator
  [prometheus]=$CACHE/bin/prometheus-$PROMETHEUS_VERSION/prometheus
  [prometheus-config-reloader]=$CACHE/bin/prometheus-operator-$PROMETHEUS_OPERATOR_VERSION/prometheus-config-reloader
  [kube-state-metrics]=$CACHE/bin/kube-state-metrics-$KUBE_STATE_METRICS_VERSION/kube-state-metrics
  [keda]=$CACHE/bin/keda-$KEDA_VERSION/keda
  [keda-metrics-apiserver]=$CACHE/bin/keda-$KEDA_VERSION/keda-adapter
)
# Where each binary sits in its image: KEDA's own manifests run /keda and /keda-adapter.
declare -A go_image_path=(
  [keda]=/keda
  [keda-metrics-apiserver]=/keda-adapter
)
go_images=(prometheus-operator prometheus prometheus-config-reloader kube-state-metrics keda keda-metrics-apiserver)
[ "$PYTHON_ONLY" = 1 ] && go_images=()
for name in "${go_images[@]}"; do
  current_step="the $name image"
  binary=${go_image_binary[$name]}
  path=${go_image_path[$name]:-/bin/$name}
  [ -x "$binary" ] || { say "missing $binary: run \`make binaries\` (devcluster/build-binaries.sh) first"; false; }
  dockerfile="FROM scratch
COPY $name $path
USER 65534:65534
ENTRYPOINT [\"$path\"]"
  key=$({ echo "recipe=$RECIPE engine=$engine"; echo "$dockerfile"; sha256sum < "$binary"; } | sha256)
  if [ ! -s "$IMAGES/$name-${key:0:12}.tar" ]; then
    mkdir -p "$tmp/$name"
    cp "$binary" "$tmp/$name/$name"
    echo "$dockerfile" > "$tmp/$name/Dockerfile"
  fi
  build_image "$name" "${go_image_ref[$name]}" "$key" "$tmp/$name" "$tmp/$name/Dockerfile"
done

# --- A server whose model yields empty masks (the canary's e2e test), FROM the server image ----
# e2e/images/broken_model.py writes a u2netp.onnx of the right shape; a pod only loads it with an
# explicit REMBG_MODEL_CHECKSUMS override. Test-only: never pushed anywhere.
BROKEN_REF=localhost/rembg-fleet/server-broken-model:$version
current_step="the broken model"
broken_dockerfile='ARG SERVER_IMAGE
FROM ${SERVER_IMAGE}
COPY --chmod=0444 u2netp.onnx /models-broken/u2netp.onnx'
# The model's bytes come from the onnx package's serializer: its version is an input too.
onnx_version=$("$PYTHON" -c 'import onnx; print(onnx.__version__)')
broken_key=$({ echo "server=$server_key onnx=$onnx_version"; echo "$broken_dockerfile"; hash_inputs e2e/images; } | sha256)
if [ ! -s "$IMAGES/server-broken-model-${broken_key:0:12}.tar" ]; then
  mkdir -p "$tmp/broken"
  "$PYTHON" "$root/e2e/images/broken_model.py" "$tmp/broken" >/dev/null
  echo "$broken_dockerfile" > "$tmp/broken/Dockerfile"
  # FROM names the server's tag: load this run's archive under it, so a tag left by another
  # checkout of the same version is never the base.
  if [ "$engine" = buildah ]; then
    B pull --quiet "docker-archive:${result_archive[server]}" >/dev/null
  else
    docker load -q -i "${result_archive[server]}" >/dev/null
  fi
fi
build_image server-broken-model "$BROKEN_REF" "$broken_key" "$tmp/broken" "$tmp/broken/Dockerfile" \
  --build-arg "SERVER_IMAGE=$SERVER_REF"

# Intermediate images of older Dockerfiles are never reused; past a bound, prune the dangling ones
# (the current layer cache is the chain under the tagged images and mostly survives).
if [ "$engine" = buildah ]; then
  dangling=$(B images --all --filter dangling=true --format '{{.ID}}' 2>/dev/null | wc -l)
  if [ "$dangling" -gt 60 ]; then
    say "pruning $dangling dangling images from $STORE"
    B rmi --prune >/dev/null || true
  fi
fi

if [ "$PYTHON_ONLY" = 1 ]; then
  trap - ERR
  say "images without Go binaries ready (REMBG_FLEET_IMAGES_PYTHON_ONLY=1: build/images.json not written)"
  exit 0
fi

# --- build/images.json: what a node imports -----------------------------------------------------
current_step="build/images.json"
mkdir -p "$root/build"
{
  echo '{"images": {'
  sep=
  for name in server operator pause prometheus-operator prometheus prometheus-config-reloader kube-state-metrics keda keda-metrics-apiserver server-broken-model; do
    case $name in
      server) ref=$SERVER_REF;; operator) ref=$OPERATOR_REF;; pause) ref=$PAUSE_REF;;
      server-broken-model) ref=$BROKEN_REF;; *) ref=${go_image_ref[$name]};;
    esac
    printf '%s  "%s": {"ref": "%s", "archive": "%s", "key": "%s", "size_bytes": %s, "build_seconds": %s, "cached": %s}' \
      "$sep" "$name" "$ref" "${result_archive[$name]}" "${result_key[$name]}" "${result_size[$name]}" \
      "${result_seconds[$name]}" "${result_cached[$name]}"
    sep=$',\n'
  done
  printf '\n}}\n'
} > "$root/build/.images.json.tmp"
"$PYTHON" -m json.tool "$root/build/.images.json.tmp" > /dev/null
mv "$root/build/.images.json.tmp" "$root/build/images.json"
trap - ERR
say "images ready; import with: ctr -n k8s.io images import ARCHIVE (list: build/images.json)"
