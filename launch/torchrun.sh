#!/usr/bin/env bash
# Run `cptron train` under torchrun on this node: one node alone, or one copy of this script per node.
#
#   launch/torchrun.sh [--nnodes N] [--nproc-per-node G] [--node-rank R] [--rdzv-endpoint HOST:PORT]
#                      [--] CONFIG.yaml [--section.field VALUE ...]
#
# Everything after the launcher options (or after `--`) goes to `cptron train` unchanged.
# Each setting comes from its option, else its variable, else SLURM's variable, else the default:
#
#   NNODES            nodes in the job                      SLURM_NNODES            default 1
#   NPROC_PER_NODE    processes (GPUs) on this node         SLURM_GPUS_ON_NODE      default: GPUs nvidia-smi lists, else 1
#   NODE_RANK         this node's index; node 0 hosts the   SLURM_NODEID            default 0 on one node
#                     rendezvous store
#   RDZV_ENDPOINT     node 0's HOST:PORT                    first host of SLURM_JOB_NODELIST, port MASTER_PORT
#                                                           (default MASTER_ADDR:MASTER_PORT, port 29500)
#   RDZV_ID           job id, the same on every node        SLURM_JOB_ID            default cptron
#   LOCAL_ADDR        this node's address as the others reach it (default: its hostname); set it where
#                     the hostname resolves to a loopback or a wrong interface
#   SHUTDOWN_TIMEOUT  seconds the workers get after SIGTERM/SIGUSR1 to save a checkpoint before they are
#                     killed: set it above one checkpoint save (default 300)
#   MAX_RESTARTS      torchrun --max-restarts (default 0). Keep 0 under SLURM: the job script requeues,
#                     and every worker exit counts as a failure to torchrun, so with restarts a
#                     resumable stop (exit 75) would start the workers again inside the same job
#   PYTHON            the interpreter that has cptron installed (default python3)
#   TORCHRUN_ARGS     more torchrun options, split on spaces (e.g. "--log-dir /tmp/tr --tee 3")
#
# One node with no endpoint given uses torchrun --standalone (a free local port).
# Exit status: 0 finished; 75 every worker saved and stopped early (SIGTERM/SIGUSR1 to this script, to
# its workers, or training.time_limit_minutes): run the same command again to resume; anything else is
# a failure. The script runs `python -m cptron.launch`, torchrun with that exit status (see its docstring).
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

nnodes="${NNODES:-${SLURM_NNODES:-1}}"
nproc="${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}"
node_rank="${NODE_RANK:-${SLURM_NODEID:-}}"
endpoint="${RDZV_ENDPOINT:-}"
rdzv_id="${RDZV_ID:-${SLURM_JOB_ID:-cptron}}"

while [[ $# -gt 0 ]]; do
    case "$1" in
        --nnodes) nnodes="$2"; shift 2 ;;
        --nnodes=*) nnodes="${1#*=}"; shift ;;
        --nproc-per-node|--nproc_per_node) nproc="$2"; shift 2 ;;
        --nproc-per-node=*|--nproc_per_node=*) nproc="${1#*=}"; shift ;;
        --node-rank|--node_rank) node_rank="$2"; shift 2 ;;
        --node-rank=*|--node_rank=*) node_rank="${1#*=}"; shift ;;
        --rdzv-endpoint|--rdzv_endpoint) endpoint="$2"; shift 2 ;;
        --rdzv-endpoint=*|--rdzv_endpoint=*) endpoint="${1#*=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) break ;;
    esac
done

if [[ $# -eq 0 ]]; then
    echo "torchrun.sh: error: no training config given (see launch/torchrun.sh --help)" >&2
    exit 2
fi

if [[ -z "$node_rank" ]]; then
    if [[ "$nnodes" != 1 ]]; then
        echo "torchrun.sh: error: --nnodes=$nnodes needs this node's rank: pass --node-rank R or set NODE_RANK" >&2
        exit 2
    fi
    node_rank=0
fi

if [[ -z "$nproc" ]]; then
    nproc=1
    if command -v nvidia-smi >/dev/null 2>&1; then
        gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
        if [[ "$gpus" -gt 0 ]]; then nproc="$gpus"; fi
    fi
fi

for pair in "nnodes=$nnodes" "nproc-per-node=$nproc" "node-rank=$node_rank"; do
    if ! [[ "${pair#*=}" =~ ^[0-9]+$ ]]; then
        echo "torchrun.sh: error: --${pair%%=*}=${pair#*=} is invalid: expected a whole number" >&2
        exit 2
    fi
done

if [[ -z "$endpoint" && "$nnodes" -gt 1 ]]; then
    master="${MASTER_ADDR:-}"
    if [[ -z "$master" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
        master="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"
    fi
    if [[ -z "$master" ]]; then
        echo "torchrun.sh: error: $nnodes nodes need a rendezvous endpoint: set RDZV_ENDPOINT or MASTER_ADDR, or pass --rdzv-endpoint HOST:PORT" >&2
        exit 2
    fi
    endpoint="$master:${MASTER_PORT:-29500}"
fi

cmd=("${PYTHON:-python3}" -m cptron.launch --nnodes "$nnodes" --nproc-per-node "$nproc")
if [[ -z "$endpoint" ]]; then
    cmd+=(--standalone)
else
    # Node 0 hosts the store: said outright, because torchrun's guess from hostnames and addresses
    # misses nodes whose name resolves elsewhere (several NICs, containers, network namespaces).
    is_host=0
    if [[ "$node_rank" -eq 0 ]]; then is_host=1; fi
    cmd+=(--rdzv-backend c10d --rdzv-endpoint "$endpoint" --rdzv-id "$rdzv_id" --rdzv-conf "is_host=$is_host")
fi
if [[ -n "${LOCAL_ADDR:-}" ]]; then
    cmd+=(--local-addr "$LOCAL_ADDR")
fi
# Preemption: cptron.launch forwards SIGTERM and SIGUSR1 (what SLURM's --signal sends) to the workers
# itself, in place of torchrun's --signals-to-handle, which would lose their exit statuses, and kills
# them after the shutdown timeout; torchrun's own --shutdown-timeout reads the same variable (the flag
# exists only in newer torch).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${SHUTDOWN_TIMEOUT:-300}"
cmd+=(--max-restarts "${MAX_RESTARTS:-0}")
if [[ -n "${TORCHRUN_ARGS:-}" ]]; then
    read -r -a extra <<< "$TORCHRUN_ARGS"
    cmd+=("${extra[@]}")
fi
cmd+=(-m cptron.cli train "$@")

echo "torchrun.sh: node $node_rank of $nnodes, $nproc process(es): ${cmd[*]}" >&2
# exec: the signals SLURM or a user sends this script reach cptron.launch itself, which forwards
# them to the workers and reports their exit status as this script's.
exec "${cmd[@]}"
