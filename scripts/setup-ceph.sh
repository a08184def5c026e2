#!/usr/bin/env bash
# Installs what bench/cephrgw.py runs: a one-node Ceph (ceph-mon, ceph-osd, radosgw) from the distribution's
# packages (Debian bookworm: Ceph 16.2). Idempotent: nothing is installed when the programs are there.
# Needs root (or sudo) to install; the tests then run the daemons as the test user, in a temporary directory.
set -euo pipefail

packages=(ceph-mon ceph-osd radosgw)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ "${#missing[@]}" -eq 0 ] && exit 0

as_root=()
if [ "$(id -u)" != 0 ]; then
  if ! command -v sudo >/dev/null; then
    echo "setup-ceph: ${missing[*]} not installed and not running as root: run \`sudo make setup-ceph\`" >&2
    exit 1
  fi
  as_root=(sudo)
fi
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# apt-get update only when the package lists cannot satisfy the install (fresh machine).
for p in "${missing[@]}"; do
  cand=$(apt-cache policy "$p" 2>/dev/null | awk '/Candidate:/ {print $2}')
  if [ -z "$cand" ] || [ "$cand" = "(none)" ]; then
    timeout 300 "${as_root[@]}" apt-get update -qq
    break
  fi
done
log=$(mktemp)
if ! timeout 600 "${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$log" 2>&1; then
  # A stale list (404 on a package) is fixed by one update and a retry.
  timeout 300 "${as_root[@]}" apt-get update -qq
  timeout 600 "${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
rm -f "$log"
