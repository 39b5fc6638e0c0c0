#!/usr/bin/env bash
# Request a TPU slice through queued resources (waits for capacity, optionally spot), then train on it (recipe).
#
#   QR_NAME=xtr-qr TPU_NAME=xtr-v4-32 ZONE=us-central2-b ACCELERATOR=v4-32 MODEL_DIR=/mnt/gcs/xtr_base \
#   MSMARCO_TRIPLES=/data/msmarco/triples.tsv T5_INIT_DIR=/data/t5-base bash launch/tpu_queued_resources.sh
#
# Spot capacity can be reclaimed: rerunning the training command with the same MODEL_DIR resumes from the latest
# checkpoint (parameters, optimizer, step and input position).
set -euo pipefail
: "${QR_NAME:?}" "${TPU_NAME:?}" "${ZONE:?}" "${ACCELERATOR:?}" "${MODEL_DIR:?}"
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}

gcloud compute tpus queued-resources create "${QR_NAME}" --node-id="${TPU_NAME}" --zone="${ZONE}" \
  --accelerator-type="${ACCELERATOR}" --runtime-version="${RUNTIME}" ${SPOT:+--spot}

until [[ "$(gcloud compute tpus queued-resources describe "${QR_NAME}" --zone="${ZONE}" \
            --format='value(state.state)')" == "ACTIVE" ]]; do
  echo "waiting for ${QR_NAME} to become ACTIVE..."; sleep 60
done

gcloud compute tpus queued-resources ssh "${QR_NAME}" --zone="${ZONE}" --worker=all --node=all --command="
  git clone https://github.com/<you>/xtr_jax.git 2>/dev/null || true; cd xtr_jax && pip install -q -e . 'jax[tpu]==0.10.2'"

# Same training command as launch/tpu_vm_pod.sh.
TPU_NAME="${TPU_NAME}" ZONE="${ZONE}" bash "$(dirname "$0")/tpu_vm_pod.sh"
