#!/usr/bin/env bash
# Docker engine for the local cluster's `local_cluster_engine=docker` option and its e2e test:
# installs docker.io when dockerd is missing, starts dockerd when none answers, and copies the
# project image (built by build-image.sh into podman's store) into docker's store.
# Idempotent: with docker running and the image up to date it takes about a second.
#
# On a machine where systemd runs docker, the daemon is already up and only the image is copied.
# Where nothing supervises it (CI containers, this test machine) dockerd is started here in the
# background; stop it with `kill $(cat .cache/docker/dockerd.pid)`.
#
# dockerd is started with --bridge=none (no default docker0 network: the cluster makes its own) and
# --ip-forward=false (dockerd never touches ip_forward, so it never switches the host's FORWARD
# policy to DROP, which it does when it enables forwarding itself). It still adds its NAT and
# isolation chains for its own networks, as podman's network backend does for its own.
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/images/env.sh

IMAGE=${CHECKPOINT4_IMAGE:-localhost/checkpoint4-debian:bookworm}
state=$PWD/.cache/docker
mkdir -p "$state"

if ! command -v dockerd >/dev/null; then
  echo "installing docker.io ..."
  export DEBIAN_FRONTEND=noninteractive
  if ! timeout 600 apt-get install -y -qq --no-install-recommends docker.io >"$state/apt.log" 2>&1; then
    timeout 300 apt-get update -qq
    timeout 600 apt-get install -y -qq --no-install-recommends docker.io
  fi
fi

if ! timeout 20 docker info >/dev/null 2>&1; then
  # Containers reach package mirrors through the host (NAT): forwarding must be on, as podman's
  # bridge networks switch it on. Done here so that dockerd (--ip-forward=false) leaves it alone.
  if [ "$(cat /proc/sys/net/ipv4/ip_forward)" != 1 ]; then
    sysctl -q -w net.ipv4.ip_forward=1
  fi
  echo "starting dockerd (log: $state/dockerd.log)"
  setsid dockerd --bridge=none --ip-forward=false --pidfile "$state/dockerd.pid" \
    >"$state/dockerd.log" 2>&1 < /dev/null &
  for _ in $(seq 60); do
    timeout 5 docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
  if ! timeout 20 docker info >/dev/null 2>&1; then
    tail -20 "$state/dockerd.log"
    echo "dockerd did not come up" >&2
    exit 1
  fi
fi

# The image: copied from podman's store when docker lacks it or holds an older recipe.
want=$(podman image inspect --format '{{ index .Config.Labels "checkpoint4.recipe" }}' "$IMAGE" 2>/dev/null || true)
if [ -z "$want" ]; then
  echo "image $IMAGE is not in podman's store: run tests/images/build-image.sh (make setup-containers)" >&2
  exit 1
fi
have=$(docker image inspect --format '{{ index .Config.Labels "checkpoint4.recipe" }}' "$IMAGE" 2>/dev/null || true)
if [ "$have" = "$want" ]; then
  echo "docker image $IMAGE is up to date (recipe $want)"
else
  echo "copying $IMAGE from podman to docker ..."
  podman save "$IMAGE" | docker load
fi
