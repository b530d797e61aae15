#!/usr/bin/env bash
# scaling-pretrain under the `deepspeed` runner: one node, or several nodes from a hostfile.
#
#   launchers/deepspeed.sh RECIPE [--set key.path=value ...] [--stop-at-step N]
#
# Adds `--set engine.name=deepspeed` unless the arguments set engine.name themselves (the ZeRO stage is
# the recipe's engine.zero_stage). The runner passes --local_rank=N to every rank.
#
# Environment (all optional):
#   NUM_GPUS         ranks per node (--num_gpus). Default: all visible GPUs (CUDA_VISIBLE_DEVICES is
#                    respected); 2 on a machine without a GPU, where it must be passed explicitly because
#                    the runner's own detection counts NUMA nodes there.
#   MASTER_PORT      port of rank 0's process-group store (default 29600)
#   MASTER_ADDR      address of the first node as the others reach it (multi-node; default: the runner
#                    asks the first hostfile host for `hostname -I` over ssh)
#   HOSTFILE         multi-node: a DeepSpeed hostfile (launchers/hostfile.example). The runner starts every
#                    node over pdsh + passwordless ssh from this node.
#   NODE_RANK        with HOSTFILE: start only this node's ranks, without ssh (--no_ssh); run the same
#                    command on every node with its own NODE_RANK and the same MASTER_ADDR.
#   DS_EXPORT_VARS   pdsh mode: names of extra variables to forward to the other nodes (space separated;
#                    OMP_NUM_THREADS, DS_ACCELERATOR, *_SOCKET_IFNAME, HF_* and TORCH_EXTENSIONS_DIR are
#                    forwarded already, and the runner forwards NCCL_*, PYTHON*, MLFLOW_* itself)
#   OMP_NUM_THREADS  threads per rank (default 1; the deepspeed runner does not set it)
#   DEEPSPEED        deepspeed executable (default: deepspeed on PATH)
#   PYTHON           interpreter used to count GPUs (default: the python next to deepspeed)
#   DS_ARGS          extra runner flags, split on spaces (e.g. "--launcher openmpi")
#   DRY_RUN=1        print the command and exit
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launcher_prelude deepspeed.sh "${DEEPSPEED:-deepspeed}" DEEPSPEED "$@"
shift
deepspeed=$tool_path

cmd=("$deepspeed" --master_port "${MASTER_PORT:-29600}")
if [[ -n ${NUM_GPUS:-} ]]; then
    cmd+=(--num_gpus "$NUM_GPUS")
elif [[ -z ${HOSTFILE:-} ]]; then
    gpus=$(count_gpus)
    # With GPUs the runner counts them itself (and honours CUDA_VISIBLE_DEVICES, which --num_gpus would
    # override). Without, its CPU accelerator reports one "device" per NUMA node.
    (( gpus > 0 )) || cmd+=(--num_gpus 2)
fi
[[ -z ${MASTER_ADDR:-} ]] || cmd+=(--master_addr "$MASTER_ADDR")

if [[ -n ${HOSTFILE:-} ]]; then
    [[ -f $HOSTFILE ]] || { echo "deepspeed.sh: HOSTFILE not found: $HOSTFILE" >&2; exit 2; }
    cmd+=(--hostfile "$HOSTFILE")
    if [[ -n ${NODE_RANK:-} ]]; then
        : "${MASTER_ADDR:?with NODE_RANK (no ssh) every node needs the same MASTER_ADDR}"
        cmd+=(--no_ssh --node_rank "$NODE_RANK")
    else
        # pdsh starts the other nodes with a bare environment. The runner forwards what a
        # .deepspeed_env names (~/ and ./, or $DS_ENV_FILE): merge those with what the ranks need.
        env_file=$(mktemp "${TMPDIR:-/tmp}/scaling-deepspeed-env.XXXXXX")
        for f in "$HOME/.deepspeed_env" ./.deepspeed_env ${DS_ENV_FILE:+"$DS_ENV_FILE"}; do
            if [[ -f $f ]]; then grep -v '^[[:space:]]*$' "$f" >>"$env_file" || true; fi
        done
        for v in OMP_NUM_THREADS DS_ACCELERATOR GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME TP_SOCKET_IFNAME \
                 HF_HOME HF_HUB_OFFLINE HF_HUB_DISABLE_TELEMETRY DO_NOT_TRACK TORCH_EXTENSIONS_DIR ${DS_EXPORT_VARS:-}; do
            if [[ -n ${!v:-} ]]; then printf '%s=%s\n' "$v" "${!v}" >>"$env_file"; fi
        done
        export DS_ENV_FILE=$env_file
    fi
fi
# shellcheck disable=SC2206  # word splitting of the extra flags is intended
[[ -z ${DS_ARGS:-} ]] || cmd+=($DS_ARGS)

engine=(--set engine.name=deepspeed)
for a in "$@"; do
    case "$a" in engine.name=*|--set=engine.name=*) engine=() ;; esac
done
cmd+=(--module scaling.pretrain "$recipe" "${engine[@]}" "$@")

# The runner's world size is known here only without a hostfile.
world=0
if [[ -z ${HOSTFILE:-} ]]; then
    world=${NUM_GPUS:-$gpus}
    (( world > 0 )) || world=2
fi
preflight "$world" "${engine[@]}" "$@"

launch "${cmd[@]}"
