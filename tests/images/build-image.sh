#!/usr/bin/env bash
# Builds the Debian bookworm image that the Molecule scenarios and the local container cluster use:
#   localhost/checkpoint4-debian:bookworm  (systemd as PID 1, python3 for Ansible, apt lists kept)
# No image registry is reachable here, so the root filesystem comes from debootstrap (Debian's
# package mirror) and is imported with `podman import`.
# Cached: skipped when an image with this recipe's label exists (package lists or RECIPE_VERSION
# changed -> rebuilt).
#
# EXTRA_PACKAGES are preinstalled only to save ~30-40 s of apt per Molecule converge; every role
# still installs what it needs itself (idempotently), so the roles work on bare machines too.
# Set CHECKPOINT4_IMAGE_REBUILD=1 to force a rebuild.
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/images/env.sh

IMAGE=${CHECKPOINT4_IMAGE:-localhost/checkpoint4-debian:bookworm}
MIRROR=http://deb.debian.org/debian
BASE_PACKAGES=python3,python3-apt,systemd,systemd-sysv,dbus,iproute2,procps,ca-certificates,sudo
EXTRA_PACKAGES=(python3-venv python3-pip git ufw iptables netcat-openbsd
                nfs-kernel-server nfs-common rpcbind nfs-ganesha nfs-ganesha-vfs libnfs-utils)
RECIPE_VERSION=1   # bump when the build steps below change
recipe=$(echo "$RECIPE_VERSION $IMAGE $MIRROR $BASE_PACKAGES ${EXTRA_PACKAGES[*]}" | sha256sum | cut -c1-16)

have=$(podman image inspect --format '{{ index .Config.Labels "checkpoint4.recipe" }}' "$IMAGE" 2>/dev/null || true)
if [ "$have" = "$recipe" ] && [ "${CHECKPOINT4_IMAGE_REBUILD:-0}" != 1 ]; then
  echo "image $IMAGE is up to date (recipe $recipe)"
  exit 0
fi

old_id=$(podman image inspect --format '{{ .Id }}' "$IMAGE" 2>/dev/null || true)
start=$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/checkpoint4-rootfs.XXXXXX")
rootfs=$work/rootfs
cleanup() {
  mountpoint -q "$rootfs/proc" && umount -l "$rootfs/proc"
  rm -rf "$work"
}
trap cleanup EXIT

echo "debootstrap bookworm into $rootfs (log: $work/debootstrap.log) ..."
if ! timeout 900 debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$rootfs" "$MIRROR" \
    >"$work/debootstrap.log" 2>&1; then
  tail -30 "$work/debootstrap.log"; tail -30 "$rootfs/debootstrap/debootstrap.log" 2>/dev/null || true
  echo "debootstrap failed" >&2
  exit 1
fi

cat > "$rootfs/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SOURCES

# HTTPS from inside goes through the same intercepting proxy as the host: trust the host's extra CAs.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
fi

# Keep services from starting inside the chroot (they would run on this host).
printf '#!/bin/sh\nexit 101\n' > "$rootfs/usr/sbin/policy-rc.d"
chmod 755 "$rootfs/usr/sbin/policy-rc.d"
mount -t proc proc "$rootfs/proc"
echo "apt-get install ${EXTRA_PACKAGES[*]} ..."
if ! timeout 900 chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    sh -c "apt-get update -qq && apt-get install -y -qq --no-install-recommends ${EXTRA_PACKAGES[*]} && update-ca-certificates" \
    >"$work/apt.log" 2>&1; then
  tail -40 "$work/apt.log"
  echo "package install in the image failed" >&2
  exit 1
fi
umount -l "$rootfs/proc"
rm -f "$rootfs/usr/sbin/policy-rc.d"
# Keep /var/lib/apt/lists (Ansible's apt cache_valid_time relies on it); drop downloaded .debs.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin
# A fresh machine-id per container (systemd creates it at boot).
: > "$rootfs/etc/machine-id"

echo "podman import -> $IMAGE ..."
tar -C "$rootfs" -c . | podman import \
  --change 'CMD ["/lib/systemd/systemd"]' \
  --change "LABEL checkpoint4.recipe=$recipe" \
  --quiet - "$IMAGE" >/dev/null
# The previous image lost its tag: remove it unless a container still uses it.
if [ -n "$old_id" ] && [ "$old_id" != "$(podman image inspect --format '{{ .Id }}' "$IMAGE")" ]; then
  podman image rm "$old_id" >/dev/null 2>&1 || true
fi
echo "built $IMAGE in $(( $(date +%s) - start )) s"
