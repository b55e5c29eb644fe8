# shellcheck shell=bash disable=SC2154  # tmp and say come from the sourcing script
# Shell helpers the image builds share (sourced by build-images.sh and build-kind-node.sh).
# The caller sets CACHE, SUITE and tmp (its scratch folder) and defines say().

sha256() { sha256sum | cut -d' ' -f1; }
archive_size() { stat -c %s "$1"; }
mb() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

remove_tree() { # dir: unmount what a half-done debootstrap left mounted inside (/proc, /sys), delete
  awk -v t="$1/" 'index($2, t) == 1 { print $2 }' /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf --one-file-system "$1"
}

debian_mirror() { # the Debian mirror apt is configured with (deb822 sources first)
  local uri
  [ -n "${DEBIAN_MIRROR:-}" ] && { echo "$DEBIAN_MIRROR"; return; }
  uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 's|^URIs:[[:space:]]*\(\S*/debian\)/\?[[:space:]]*$|\1|p' | head -n1)
  [ -n "$uri" ] || uri=$(grep -hsE "^deb\s+\S+/debian/?\s+$SUITE\s" /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}' | head -n1)
  echo "${uri:-http://deb.debian.org/debian}"
}

slim_rootfs() { # dir: a debootstrap tree made slim, then cleared of what the runtime provides
  local dir=$1
  # Slim like Docker's debian:*-slim: no docs, man pages, locales or apt lists, now or later.
  cat > "$dir/etc/dpkg/dpkg.cfg.d/rembg-fleet-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EOF
  printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' > "$dir/etc/apt/apt.conf.d/rembg-fleet-slim"
  find "$dir/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete
  find "$dir/usr/share/doc" -mindepth 1 -type d -empty -delete
  find "$dir/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
  rm -rf "$dir"/usr/share/{man,info,lintian}/* "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin \
    "$dir"/var/cache/apt/archives/*.deb "$dir"/var/cache/debconf/*-old "$dir"/var/lib/dpkg/*-old \
    "$dir"/var/log/* "$dir"/tmp/* "$dir"/root/.cache
  # The runtime provides these; debootstrap copied the host's.
  : > "$dir/etc/resolv.conf"; : > "$dir/etc/hostname"; rm -f "$dir/etc/machine-id"
}

# --- buildah with storage of its own ------------------------------------------------------------
STORE=$CACHE/buildah/storage
RUNROOT=${REMBG_FLEET_BUILDAH_RUNROOT:-/run/rembg-fleet-buildah/$(echo "$STORE" | sha256 | cut -c1-12)}
B() { buildah --root "$STORE" --runroot "$RUNROOT" --storage-driver "$DRIVER" "$@"; }

pick_driver() { # overlay when the kernel mounts it here (a layer on a layer), else vfs; remembered
  local file=$CACHE/buildah/driver
  if [ -s "$file" ]; then DRIVER=$(cat "$file"); return; fi
  mkdir -p "$CACHE/buildah"
  local probe=$tmp/probe out ctr mnt
  DRIVER=overlay
  probe_overlay() {
    P() { buildah --root "$probe/storage" --runroot "$probe/run" --storage-driver overlay "$@"; }
    ctr=$(P from scratch) && mnt=$(P mount "$ctr") && echo probe > "$mnt/probe" && P umount "$ctr" >/dev/null \
      && P commit -q --rm "$ctr" localhost/probe >/dev/null \
      && ctr=$(P from --pull=never localhost/probe) && mnt=$(P mount "$ctr") && grep -q probe "$mnt/probe" \
      && P rm "$ctr" >/dev/null && P rmi -a -f >/dev/null
  }
  if out=$(probe_overlay 2>&1); then
    say "storage driver: overlay"
  else
    DRIVER=vfs
    say "storage driver: vfs (overlay did not work on kernel $(uname -r): $(echo "$out" | tail -n1))"
  fi
  buildah --root "$probe/storage" --runroot "$probe/run" --storage-driver overlay rm -a >/dev/null 2>&1 || true
  rm -rf "$probe"
  echo "$DRIVER" > "$file"
}
