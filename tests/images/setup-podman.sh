#!/usr/bin/env bash
# Installs rootful podman (runc) and the tools the container tests use, then writes the project's
# containers.conf. Idempotent: when everything is there it only rewrites that small file (< 1 s).
#
# How other code gets the container settings (podman here needs runc and explicit ulimits, see
# docs/TESTING-CONTAINERS.md): this script writes them to <repo>/.cache/containers/containers.conf
# and never touches /etc. Anything that runs podman (molecule, tests, scripts) must set
#     CONTAINERS_CONF=<repo>/.cache/containers/containers.conf
#   - shell:  source tests/images/env.sh          (creates the file if missing, exports the variable)
#   - Python: env["CONTAINERS_CONF"] = str(repo_root / ".cache/containers/containers.conf")
#             (tests/molecule/test_molecule.py does this for every molecule run)
set -euo pipefail
cd "$(dirname "$0")/../.."

packages=(podman runc conmon containernetworking-plugins iptables golang-github-containers-common
          catatonit debootstrap libnfs-utils)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # apt-get update only when the package lists cannot satisfy the install (fresh machine).
  need_update=0
  for p in "${missing[@]}"; do
    cand=$(apt-cache policy "$p" 2>/dev/null | awk '/Candidate:/ {print $2}')
    if [ -z "$cand" ] || [ "$cand" = "(none)" ]; then need_update=1; break; fi
  done
  if [ "$need_update" = 1 ]; then
    timeout 300 apt-get update -qq
  fi
  if ! timeout 600 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/tmp/setup-podman-apt.log 2>&1; then
    # A stale list (404 on a package) is fixed by one update and a retry.
    timeout 300 apt-get update -qq
    timeout 600 apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
fi

bash tests/images/write-containers-conf.sh
