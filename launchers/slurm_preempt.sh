# Sourced by the SLURM batch scripts after they start the training step in the background:
#   wait_and_requeue PID
# waits for the step (PID: srun, or the deepspeed runner) and exits with its status. When SLURM sends
# SIGUSR1 to the batch shell (#SBATCH --signal=B:USR1@SECONDS, before the time limit), the shell relays
# SIGUSR1 to every process of the job's steps (`scancel --signal`, which leaves this batch shell out),
# where each rank's handler asks for a checkpoint at the next step boundary (scaling/trainer.py); the
# launchers make torchrun and the deepspeed runner ignore SIGUSR1. After the ranks saved and exited 0,
# `scontrol requeue` puts the job back in the queue, and the requeued job resumes from that checkpoint
# (checkpoint.resume=auto). A SIGTERM (a preemption, or the time limit itself) reaches every process
# from SLURM directly: the ranks checkpoint the same way, within the cluster's KillWait / GraceTime.

_relay_stop() {
    (( preempted )) && return  # once: a Slurm whose scancel also signals the batch shell would loop
    echo "[slurm] SIGUSR1: every rank checkpoints at the next step boundary and exits; then requeue" >&2
    preempted=1
    scancel --signal=USR1 "${SLURM_JOB_ID:?}" || echo "[slurm] scancel --signal=USR1 failed" >&2
}

wait_and_requeue() {
    local pid=$1 rc
    preempted=0
    trap _relay_stop USR1
    # `wait` returns (status > 128) as soon as a trapped signal arrives: wait again until the step ends.
    while true; do
        rc=0
        wait "$pid" || rc=$?
        if (( rc > 128 )) && kill -0 "$pid" 2>/dev/null; then continue; fi
        break
    done
    trap - USR1
    if (( preempted && rc == 0 )); then
        echo "[slurm] checkpoint written; requeueing job $SLURM_JOB_ID" >&2
        scontrol requeue "$SLURM_JOB_ID"
    fi
    exit "$rc"
}
