#!/usr/bin/env bash
# scaling-pretrain under torchrun: one node by default, or one node of a multi-node job (c10d rendezvous).
#
#   launchers/torchrun.sh RECIPE [--set key.path=value ...] [--stop-at-step N]
#
# Single node (default): `torchrun --standalone` with NPROC_PER_NODE ranks.
# Multi-node: run the same command on every node with NNODES, NODE_RANK and RDZV_ENDPOINT set.
#
# Environment (all optional unless said otherwise):
#   NPROC_PER_NODE   ranks on this node (default: the visible GPUs; 2 on a machine without a GPU)
#   NNODES           number of nodes (or MIN:MAX); setting it (or RDZV_ENDPOINT) selects multi-node mode
#   NODE_RANK        multi-node: this node's index 0..NNODES-1 (required); node 0 hosts the rendezvous store
#   RDZV_ENDPOINT    multi-node: host:port of node 0, reachable from every node (required)
#   RDZV_ID          multi-node: job id shared by all nodes (default: $SLURM_JOB_ID, else "scaling")
#   RDZV_CONF        extra --rdzv-conf entries, e.g. join_timeout=1800
#   LOCAL_ADDR       multi-node: this node's address as the other nodes reach it; node 0's becomes the
#                    ranks' MASTER_ADDR (default: torchrun uses the node's FQDN)
#   OMP_NUM_THREADS  threads per rank (default 1)
#   TORCHRUN         torchrun executable (default: torchrun on PATH)
#   PYTHON           interpreter used to count GPUs (default: the python next to torchrun)
#   TORCHRUN_ARGS    extra torchrun flags, split on spaces (e.g. "--max-restarts 3")
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds torchrun gives the ranks after a SIGTERM (default here 300)
#   DRY_RUN=1        print the command and exit
# gloo/nccl: the engine picks gloo on CPU and NCCL on GPU. Set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME
# to the interface the nodes reach each other on when the hostname resolves to another one.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launcher_prelude torchrun.sh "${TORCHRUN:-torchrun}" TORCHRUN "$@"
shift
torchrun=$tool_path

if [[ -z ${NPROC_PER_NODE:-} ]]; then
    gpus=$(count_gpus)
    NPROC_PER_NODE=$(( gpus > 0 ? gpus : 2 ))
fi

# On SIGTERM (a preemption, the time limit) torchrun forwards it to the ranks, which checkpoint at the
# next step boundary, and kills them after this many seconds (torch's default, 30 s, is short of a save).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}

cmd=("$torchrun" --nproc-per-node "$NPROC_PER_NODE")
if [[ -n ${NNODES:-} || -n ${RDZV_ENDPOINT:-} ]]; then
    : "${NNODES:?multi-node needs NNODES}"
    : "${NODE_RANK:?multi-node needs NODE_RANK (0..NNODES-1)}"
    : "${RDZV_ENDPOINT:?multi-node needs RDZV_ENDPOINT=host:port of node 0}"
    # Node 0 hosts the c10d store. Saying so explicitly also works where the endpoint is an address
    # that torch cannot match to this machine's hostname (a second NIC, a network namespace).
    is_host=$([[ $NODE_RANK == 0 ]] && echo 1 || echo 0)
    # (--node-rank is for static rendezvous only: c10d numbers the nodes by their sorted addresses.)
    cmd+=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT"
          --rdzv-id "${RDZV_ID:-${SLURM_JOB_ID:-scaling}}" --rdzv-conf "is_host=$is_host${RDZV_CONF:+,$RDZV_CONF}")
    [[ -z ${LOCAL_ADDR:-} ]] || cmd+=(--local-addr "$LOCAL_ADDR")
else
    cmd+=(--standalone)   # rendezvous on localhost with a free port: several jobs can share a machine
fi
# shellcheck disable=SC2206  # word splitting of the extra flags is intended
[[ -z ${TORCHRUN_ARGS:-} ]] || cmd+=($TORCHRUN_ARGS)
cmd+=(-m scaling.pretrain "$recipe" "$@")

nodes=${NNODES:-1}
[[ $nodes =~ ^[0-9]+$ ]] && world=$(( NPROC_PER_NODE * nodes )) || world=0   # MIN:MAX: elastic, unknown
preflight "$world" "$@"

launch "${cmd[@]}"
