#!/usr/bin/env bash
# Distributed testing on one or more machines with torchrun.
#
# Usage: tools/dist_test.sh CONFIG CHECKPOINT NUM_PROCS [test.py options...]
# Environment: NNODES (1), NODE_RANK (0), PORT (29500), MASTER_ADDR (127.0.0.1), PYTHON (python).
# Without CUDA each process tests on the CPU and the processes talk over gloo.
set -euo pipefail
# shellcheck source=tools/_launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"

require_args 3 "CONFIG CHECKPOINT NUM_PROCS [test.py options...]" "$@"
CONFIG=$1 CHECKPOINT=$2 NUM_PROCS=$3
shift 3
run_torchrun "$NUM_PROCS" test.py "$CONFIG" "$CHECKPOINT" "$@"
