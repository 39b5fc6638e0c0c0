#!/usr/bin/env bash
# XTR-base on a Cloud TPU VM pod slice (recipe). Every worker runs the same command; jax.distributed is started by
# xtr_jax.distributed.initialize() with TPU auto-detection (JAX_PLATFORMS=tpu), each host feeds its shard of the
# global batch, process 0 writes metrics and the final model dir. MODEL_DIR must be a POSIX path shared by all workers (e.g. a gcsfuse
# mount of a bucket at /mnt/gcs): the writability check and config writer use the local filesystem API.
#
#   TPU_NAME=xtr-v4-32 ZONE=us-central2-b MODEL_DIR=/mnt/gcs/xtr_base_msmarco \
#   MSMARCO_TRIPLES=/data/msmarco/triples.tsv T5_INIT_DIR=/data/t5-base bash launch/tpu_vm_pod.sh
#
# One-time setup on all workers (same command through --worker=all):
#   gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
#     git clone https://github.com/<you>/xtr_jax.git && cd xtr_jax && pip install -e . 'jax[tpu]==0.10.2'"
# A preempted or crashed job is resumed by running this script again with the same MODEL_DIR.
set -euo pipefail
: "${TPU_NAME:?}" "${ZONE:?}" "${MODEL_DIR:?}" "${MSMARCO_TRIPLES:?}" "${T5_INIT_DIR:?}"
GIN_FILE=${GIN_FILE:-experiments/xtr_base_msmarco.gin}

gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=all --command="
  cd ~/xtr_jax && JAX_PLATFORMS=tpu python -m xtr_jax.train \
    --gin_file=${GIN_FILE} \
    --gin.MODEL_DIR=\"'${MODEL_DIR}'\" \
    --gin.MSMARCO_TRIPLES=\"'${MSMARCO_TRIPLES}'\" \
    --gin.T5_INIT_DIR=\"'${T5_INIT_DIR}'\" \
    --gin.VOCAB_PATH=\"'${T5_INIT_DIR}/spiece.model'\" \
    2>&1 | tee -a ~/xtr_train.log"
