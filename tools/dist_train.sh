#!/usr/bin/env bash
# Distributed training on one or more machines with torchrun.
#
# Usage: tools/dist_train.sh CONFIG NUM_PROCS [train.py options...]
# Environment: NNODES (1), NODE_RANK (0), PORT (29500), MASTER_ADDR (127.0.0.1), PYTHON (python).
# Without CUDA each process trains on the CPU and the processes talk over gloo.
set -euo pipefail
# shellcheck source=tools/_launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"

require_args 2 "CONFIG NUM_PROCS [train.py options...]" "$@"
CONFIG=$1 NUM_PROCS=$2
shift 2
run_torchrun "$NUM_PROCS" train.py "$CONFIG" "$@"
