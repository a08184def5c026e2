#!/usr/bin/env bash
# The spec's automated launch, run on the master (or any controller): starts the training job on
# every node of the inventory with its node rank (ansible-playbook train.yml), then reports status.
#
#   scripts/launch_distributed.sh                          # inventory from ansible.cfg (inventory/physical)
#   scripts/launch_distributed.sh -i inventory/docker --steps 400 --checkpoint-interval 50
#   scripts/launch_distributed.sh --stop                   # stop-training.yml
#   scripts/launch_distributed.sh --status                 # status.yml only
# Anything after `--` goes to ansible-playbook unchanged (e.g. -- --limit node0 -K).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

playbook=train.yml
show_status=1
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    -i|--inventory)        args+=(-i "$2"); shift 2 ;;
    --steps)               args+=(-e "training_steps=$2"); shift 2 ;;
    --checkpoint-interval) args+=(-e "training_checkpoint_interval=$2"); shift 2 ;;
    --stop)                playbook=stop-training.yml; show_status=0; shift ;;
    --status)              playbook=status.yml; show_status=0; shift ;;
    --no-status)           show_status=0; shift ;;
    -h|--help)             usage 0 ;;
    --)                    shift; args+=("$@"); break ;;
    *)                     echo "unknown option: $1" >&2; usage 2 ;;
  esac
done

# The repo's venv when there is one (make setup), else ansible-playbook from PATH.
ansible_playbook=ansible-playbook
[ -x .venv/bin/ansible-playbook ] && ansible_playbook=.venv/bin/ansible-playbook
command -v "$ansible_playbook" >/dev/null || { echo "ansible-playbook not found: run 'make setup'" >&2; exit 2; }

"$ansible_playbook" "${args[@]}" "$playbook"
if [ "$show_status" = 1 ]; then
  "$ansible_playbook" "${args[@]}" status.yml
fi
