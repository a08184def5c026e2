# Source me (bash): exports CONTAINERS_CONF for podman, writing the file first if it is missing.
#   source tests/images/env.sh && podman ps
_ck4_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
[ -f "$_ck4_repo/.cache/containers/containers.conf" ] || bash "$_ck4_repo/tests/images/write-containers-conf.sh"
export CONTAINERS_CONF="$_ck4_repo/.cache/containers/containers.conf"
unset _ck4_repo
