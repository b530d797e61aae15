#!/usr/bin/env bash
# Write a DeepSpeed hostfile for the current SLURM allocation: one "<host> slots=<gpus>" line per node.
#
#   launchers/slurm_hostfile.sh [OUT]        (OUT "-" or absent: stdout)
#
# Hosts: `scontrol show hostnames "$SLURM_JOB_NODELIST"`, in allocation order (the first is node 0).
# Slots per node: GPUS_PER_NODE, else SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE (a "type:N" value gives N).
set -euo pipefail

: "${SLURM_JOB_NODELIST:?not inside a SLURM allocation (SLURM_JOB_NODELIST is unset)}"
slots=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}}
slots=${slots##*:}
[[ $slots =~ ^[0-9]+$ && $slots -gt 0 ]] || {
    echo "slurm_hostfile.sh: GPUs per node unknown ('$slots'); set GPUS_PER_NODE" >&2
    exit 2
}
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
(( ${#hosts[@]} > 0 )) || { echo "slurm_hostfile.sh: no hosts in '$SLURM_JOB_NODELIST'" >&2; exit 2; }

out=${1:--}
[[ $out == - ]] || exec >"$out"
echo "# DeepSpeed hostfile for SLURM job ${SLURM_JOB_ID:-?} ($SLURM_JOB_NODELIST)"
for h in "${hosts[@]}"; do echo "$h slots=$slots"; done
