#!/usr/bin/env bash
# Training on a Slurm cluster: one task per GPU, started with srun.
#
# Usage: tools/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR [train.py options...]
# Environment: GPUS (8), GPUS_PER_NODE (8), CPUS_PER_TASK (5), SRUN_ARGS (extra srun options),
# PYTHON (python). MASTER_PORT (29500) and MASTER_ADDR (the first node) reach every task.
set -euo pipefail
# shellcheck source=tools/_launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"

require_args 4 "PARTITION JOB_NAME CONFIG WORK_DIR [train.py options...]" "$@"
PARTITION=$1 JOB_NAME=$2 CONFIG=$3 WORK_DIR=$4
shift 4
run_srun "$PARTITION" "$JOB_NAME" train.py "$CONFIG" --work-dir="$WORK_DIR" "$@"
