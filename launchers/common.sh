# Sourced by torchrun.sh and deepspeed.sh: the argument check, the repository on PYTHONPATH, threads
# per rank, finding the launcher executable, and running (or, with DRY_RUN=1, printing) the command.

usage() {
    sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//' >&2
    echo "see launchers/README.md for the environment variables" >&2
    exit "${1:-2}"
}

# launcher_prelude NAME EXECUTABLE VAR "$@": sets recipe, repo, tool_path and PYTHON.
# The caller then drops the recipe from its own arguments with `shift`.
launcher_prelude() {
    local name=$1 tool=$2 var=$3
    shift 3
    [[ $# -ge 1 ]] || usage 2
    case "$1" in
        -h|--help) usage 0 ;;
        -*) echo "$name: the first argument must be the recipe, got '$1'" >&2; usage 2 ;;
    esac
    recipe=$1
    [[ -f $recipe ]] || { echo "$name: recipe not found: $recipe" >&2; exit 2; }
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"   # `scaling` importable without `pip install -e .`
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    tool_path=$(command -v "$tool") || {
        echo "$name: '$tool' not found; activate the venv or set $var=/path/to/$(basename "$tool")" >&2
        exit 2
    }
    if [[ -z ${PYTHON:-} ]]; then
        PYTHON=$(dirname "$tool_path")/python
        [[ -x $PYTHON ]] || PYTHON=python3
    fi
}

count_gpus() {
    "$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0
}

# preflight WORLD_SIZE ARGS...: the recipe, engine and batch plan checked once, before any rank starts,
# so a bad key or a batch that does not split prints one line instead of one traceback per rank.
# WORLD_SIZE 0: unknown here (a hostfile, an elastic node range); the recipe alone is checked.
preflight() {
    local world=$1
    shift
    [[ ${DRY_RUN:-0} == 1 ]] && return 0
    "$PYTHON" -m scaling.pretrain "$recipe" "$@" --check --world-size "$world" || exit $?
}

launch() {
    echo "[launchers] $*" >&2
    [[ ${DRY_RUN:-0} == 1 ]] && exit 0
    # SIGUSR1 asks the ranks for a checkpoint and a clean exit (scaling/trainer.py; SLURM relays it to
    # every process of the job, launchers/slurm_preempt.sh). torchrun's agent and the deepspeed runner
    # would die of it (the default action) and take the ranks down: ignored here, which they inherit
    # (an ignored signal stays ignored across exec and fork); each rank installs its own handler.
    trap '' USR1
    exec "$@"
}
