#!/usr/bin/env bash
# Launcher code shared by tools/dist_train.sh, tools/dist_test.sh, tools/slurm_train.sh and
# tools/slurm_test.sh, which source it; it is not a command of its own.
#
# Usage (in a launcher script): source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
#   require_args MIN "ARGUMENTS..." "$@"        the usage line and exit 2 with fewer than MIN
#   run_torchrun NUM_PROCS TOOL ARGS...          torchrun tools/TOOL ARGS --launcher pytorch
#   run_srun PARTITION JOB_NAME TOOL ARGS...     srun tools/TOOL ARGS --launcher slurm
# Environment: run_torchrun: NNODES (1), NODE_RANK (0), PORT (29500), MASTER_ADDR (127.0.0.1);
# run_srun: GPUS (8), GPUS_PER_NODE (8), CPUS_PER_TASK (5), SRUN_ARGS (extra srun options);
# both: PYTHON (python).
set -euo pipefail

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    echo "usage: source $0 from a launcher script (tools/dist_train.sh, ...); it runs nothing" >&2
    exit 2
fi

LAUNCH_TOOLS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Prints the calling script's usage line and exits when it got fewer than MIN arguments.
require_args() {
    local min=$1 usage=$2
    shift 2
    if [ "$#" -lt "$min" ]; then
        echo "usage: $0 $usage" >&2
        exit 2
    fi
}

# A count given in the wrong place (a path for NUM_PROCS) fails here with its name, not later.
require_count() {
    local name=$1 value=$2
    if ! [[ $value =~ ^[1-9][0-9]*$ ]]; then
        echo "$0: $name must be a positive whole number, got '$value'" >&2
        exit 2
    fi
}

run_torchrun() {
    local nprocs=$1 tool=$2
    shift 2
    require_count NUM_PROCS "$nprocs"
    # --launcher comes before the user's options, so that one of theirs still wins.
    exec "${PYTHON:-python}" -m torch.distributed.run \
        --nnodes="${NNODES:-1}" \
        --node_rank="${NODE_RANK:-0}" \
        --master_addr="${MASTER_ADDR:-127.0.0.1}" \
        --nproc_per_node="$nprocs" \
        --master_port="${PORT:-29500}" \
        "$LAUNCH_TOOLS_DIR/$tool" --launcher pytorch "$@"
}

run_srun() {
    local partition=$1 job_name=$2 tool=$3
    shift 3
    local gpus=${GPUS:-8} gpus_per_node=${GPUS_PER_NODE:-8}
    require_count GPUS "$gpus"
    require_count GPUS_PER_NODE "$gpus_per_node"
    local -a srun_args=()
    read -r -a srun_args <<< "${SRUN_ARGS:-}"
    # Expanded as ${a[@]+"${a[@]}"}: under set -u, bash < 4.4 calls an empty "${a[@]}" unbound.
    exec srun -p "$partition" \
        --job-name="$job_name" \
        --gres=gpu:"$gpus_per_node" \
        --ntasks="$gpus" \
        --ntasks-per-node="$gpus_per_node" \
        --cpus-per-task="${CPUS_PER_TASK:-5}" \
        --kill-on-bad-exit=1 \
        ${srun_args[@]+"${srun_args[@]}"} \
        "${PYTHON:-python}" -u "$LAUNCH_TOOLS_DIR/$tool" --launcher=slurm "$@"
}
