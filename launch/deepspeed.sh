#!/usr/bin/env bash
# Run `cptron train` through the deepspeed launcher, as Megatron-DeepSpeed and GPT-NeoX jobs start.
#
#   launch/deepspeed.sh [--] CONFIG.yaml [--section.field VALUE ...]
#
# It runs   deepspeed [--hostfile H] [--no_ssh --node_rank R] ... --module cptron.cli train CONFIG ...
# The deepspeed launcher puts --local_rank=N before `train` and sets RANK, LOCAL_RANK, WORLD_SIZE,
# MASTER_ADDR and MASTER_PORT; `cptron` accepts both. Needs `pip install deepspeed` (DS_BUILD_OPS=0 is
# enough: cptron uses none of DeepSpeed's ops, only its launcher).
#
# Variables:
#   HOSTFILE          MPI-style hostfile, one "HOSTNAME slots=GPUS" line per node (see launch/hostfile.example);
#                     unset: this node alone
#   NODE_RANK         set it to start each node yourself, one copy of this script per node (srun, or
#                     without ssh), with HOSTFILE naming every node: runs `deepspeed --no_ssh --node_rank
#                     NODE_RANK`. Unset with a hostfile of several nodes: deepspeed starts every node over ssh
#   GPUS_PER_NODE     --num_gpus: processes on each node (unset: all slots of the hostfile, else every GPU)
#   MASTER_ADDR       node 0's address (needed with NODE_RANK; else deepspeed asks the first host over ssh)
#   MASTER_PORT       port of rank 0's store (default 29500)
#   PYTHON            interpreter with cptron and deepspeed installed (default python3)
#   DEEPSPEED_ARGS    more launcher options, split on spaces (e.g. "--include worker-0:0,1")
#
# Signals: SIGTERM and SIGUSR1 to this script go to the training processes of this node, SIGINT (Ctrl-C)
# as SIGTERM (the launcher's own handler would kill them without a checkpoint); every rank then finishes
# its step, saves and exits 75, on the other nodes too, since the ranks agree to stop together.
# Exit status: 0 finished; 75 saved and stopped early (rerun the same command to resume); else failure.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    --) shift ;;
esac
if [[ $# -eq 0 ]]; then
    echo "deepspeed.sh: error: no training config given (see launch/deepspeed.sh --help)" >&2
    exit 2
fi

python="${PYTHON:-python3}"
cmd=("$python" -m deepspeed.launcher.runner)
if [[ -n "${HOSTFILE:-}" ]]; then
    if [[ ! -f "$HOSTFILE" ]]; then
        echo "deepspeed.sh: error: HOSTFILE=$HOSTFILE is invalid: expected an existing hostfile" >&2
        exit 2
    fi
    cmd+=(--hostfile "$HOSTFILE")
fi
if [[ -n "${NODE_RANK:-}" ]]; then
    if [[ -z "${HOSTFILE:-}" ]]; then  # without one, deepspeed's world is this node alone, at 127.0.0.1
        echo "deepspeed.sh: error: NODE_RANK=$NODE_RANK needs HOSTFILE (every node of the job and its slots)" >&2
        exit 2
    fi
    if [[ -z "${MASTER_ADDR:-}" ]]; then
        echo "deepspeed.sh: error: NODE_RANK=$NODE_RANK needs MASTER_ADDR (node 0's address)" >&2
        exit 2
    fi
    cmd+=(--no_ssh --node_rank "$NODE_RANK")
fi
if [[ -n "${MASTER_ADDR:-}" ]]; then
    cmd+=(--master_addr "$MASTER_ADDR")
fi
cmd+=(--master_port "${MASTER_PORT:-29500}")
if [[ -n "${GPUS_PER_NODE:-}" ]]; then
    cmd+=(--num_gpus "$GPUS_PER_NODE")
fi
if [[ -n "${DEEPSPEED_ARGS:-}" ]]; then
    read -r -a extra <<< "$DEEPSPEED_ARGS"
    cmd+=("${extra[@]}")
fi
cmd+=(--module cptron.cli train "$@")

echo "deepspeed.sh: ${cmd[*]}" >&2
"${cmd[@]}" &
launcher=$!

# The training processes of this node: the children of the per-node launch process, itself a child
# of the runner (deepspeed -> deepspeed.launcher.launch -> ranks). Started over ssh (pdsh), the ranks
# live on other machines: the runner gets the signal, and its own handler ends them all unsaved.
# shellcheck disable=SC2317,SC2329  # called from the traps below
forward() {
    local middle pid sent=0
    echo "deepspeed.sh: received SIG$1: forwarding it to the training processes (they save and exit 75)" >&2
    interrupted=1
    for middle in $(ps -o pid= --ppid "$launcher" 2>/dev/null || true); do
        if ps -o args= -p "$middle" 2>/dev/null | grep -q 'deepspeed.launcher.launch'; then
            for pid in $(ps -o pid= --ppid "$middle" 2>/dev/null || true); do
                kill -s "$1" "$pid" 2>/dev/null || true
                sent=1
            done
        fi
    done
    if [[ "$sent" -eq 0 ]]; then
        kill -s "$1" "$launcher" 2>/dev/null || true
    fi
}
trap 'forward TERM' TERM
trap 'forward USR1' USR1
# Background jobs of a script ignore SIGINT, the ranks included: Ctrl-C becomes a SIGTERM to them.
trap 'forward TERM' INT

# `wait` returns early when a trapped signal arrives: wait again until the launcher itself has ended
# (bash keeps a reaped job's status, so a second wait returns it).
while true; do
    interrupted=0
    if wait "$launcher"; then status=0; else status=$?; fi
    if [[ "$interrupted" -eq 0 ]]; then
        break
    fi
done
exit "$status"
