#!/usr/bin/env bash
# Local CPU training (recipe). Single process:
#   bash launch/local_cpu.sh /tmp/xtr_tiny_squad
# Two processes on this machine (what a 2-host pod does), 4 simulated CPU devices each, mesh data 4 x model 2:
#   NUM_PROCESSES=2 bash launch/local_cpu.sh /tmp/xtr_tiny_squad_2proc
# Start-up goes through xtr_jax.distributed.initialize() (XTR_COORDINATOR_ADDRESS / XTR_NUM_PROCESSES /
# XTR_PROCESS_ID; CPU collectives use gloo). Run from the repository root.
set -euo pipefail
MODEL_DIR=${1:?usage: local_cpu.sh MODEL_DIR}
GIN_FILE=${GIN_FILE:-experiments/xtr_tiny_squad.gin}
NUM_PROCESSES=${NUM_PROCESSES:-1}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-$((8 / NUM_PROCESSES))}
PORT=${PORT:-12355}
export JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}"

if [[ "${NUM_PROCESSES}" == 1 ]]; then
  exec python -m xtr_jax.train --gin_file="${GIN_FILE}" --gin.MODEL_DIR="'${MODEL_DIR}'" \
    --gin_file=runs/mesh_4x2.gin "${@:2}"
fi

pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  XTR_COORDINATOR_ADDRESS="127.0.0.1:${PORT}" XTR_NUM_PROCESSES="${NUM_PROCESSES}" XTR_PROCESS_ID="${i}" \
    python -m xtr_jax.train --gin_file="${GIN_FILE}" --gin.MODEL_DIR="'${MODEL_DIR}'" \
    --gin_file=runs/mesh_4x2.gin "${@:2}" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "${pid}" || status=$?; done
exit "${status}"
