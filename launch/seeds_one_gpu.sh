#!/usr/bin/env bash
# Several trainings, each followed by its evaluation, side by side on one accelerator (recipe). Each RUN is
# NAME:EXPERIMENT:SEED[:LEADER]:
#   bash launch/seeds_one_gpu.sh /tmp/seeds xtr_s2:xtr_minilm_cpu_b256:2 colbert_s2:colbert_minilm_cpu_b256:2 \
#     xtr_s3:xtr_minilm_cpu_b256:3:xtr_s2 colbert_s3:colbert_minilm_cpu_b256:3:colbert_s2
#   python -m xtr_jax.report --gin.xtr_report.evals="[('XTR s2', '/tmp/seeds/xtr_s2/eval'), ...]" \
#     --gin.xtr_report.groups="[('XTR loss', ['XTR s2', 'XTR s3']), ('ColBERT loss', ['ColBERT s2', 'ColBERT s3'])]"
# A run trains with `python -m xtr_jax.train --gin_file=experiments/EXPERIMENT.gin --gin.SEED=SEED` into
# OUT/NAME/train, then evaluates the model with `python -m xtr_jax.eval --gin_file=$EVAL_GIN` over EXACT token search
# (brute force: no index build, and no index error to tell apart from the seed's effect) into OUT/NAME/eval.
# A run with a LEADER starts once the leader has logged its 10th step (or stopped): the two share every shape, so the
# leader's programs are then in the persistent compilation cache and the follower skips compiling them (about three
# minutes of an H200's time per training, session 15). Several processes share the GPU: no memory preallocation.
# Environment: DEADLINE (seconds; stops every run still going: a dataset whose evaluation finished keeps its outputs,
# and xtr_jax.report reads them), EVAL_GIN (default experiments/eval_minilm_cpu.gin), TRAIN_ARGS / EVAL_ARGS (extra
# flags for every run), PYTHON. Logs: OUT/NAME/log.txt, OUT/progress.txt. Run from the repository root.
set -uo pipefail
OUT=${1:?usage: seeds_one_gpu.sh OUT NAME:EXPERIMENT:SEED[:LEADER] ...}
shift
[[ $# -gt 0 ]] || { echo "seeds_one_gpu.sh: no runs given" >&2; exit 2; }
PYTHON=${PYTHON:-python}
EVAL_GIN=${EVAL_GIN:-experiments/eval_minilm_cpu.gin}
DEADLINE=${DEADLINE:-0}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-${OUT}/jax_cache}
mkdir -p "${OUT}"
T0=$(date +%s)
log() { echo "[$(($(date +%s) - T0))s] $*" | tee -a "${OUT}/progress.txt"; }
stamp() { while IFS= read -r line; do echo "[$(($(date +%s) - T0))s] ${line}"; done; }
quiet() { grep --line-buffered -v 'it/s\]\|s/it\]\|batch/s\]\|doc/s\]'; }  # progress bars stay out of the logs

declare -A SEEN=()
for run in "$@"; do  # every run is checked before any starts
  IFS=: read -r name experiment seed leader extra <<<"${run}"
  if [[ -z "${name}" || -z "${experiment}" || ! "${seed}" =~ ^[0-9]+$ || -n "${extra}" ]]; then
    echo "seeds_one_gpu.sh: '${run}': expected NAME:EXPERIMENT:SEED[:LEADER] with an integer SEED" >&2; exit 2
  fi
  [[ -f "gin_configs/experiments/${experiment}.gin" ]] || {
    echo "seeds_one_gpu.sh: '${run}': gin_configs/experiments/${experiment}.gin not found" >&2; exit 2; }
  [[ -z "${leader}" || -n "${SEEN[${leader}]:-}" ]] || {
    echo "seeds_one_gpu.sh: '${run}': leader '${leader}' is not a run given before it" >&2; exit 2; }
  SEEN[${name}]=1
done

one() {
  local name=$1 experiment=$2 seed=$3 leader=$4 dir="${OUT}/$1"
  mkdir -p "${dir}"
  : >"${dir}/log.txt"
  if [[ -n "${leader}" ]]; then
    until grep -q "step 10/" "${OUT}/${leader}/log.txt" 2>/dev/null || [[ -f "${OUT}/${leader}/train_exit" ]]; do
      sleep 2
    done
  fi
  log "${name}: training ${experiment} at seed ${seed}"
  # shellcheck disable=SC2086  # TRAIN_ARGS / EVAL_ARGS are word lists
  ${PYTHON} -m xtr_jax.train --gin_file="experiments/${experiment}.gin" --gin.MODEL_DIR="'${dir}/train'" \
    --gin.SEED="${seed}" ${TRAIN_ARGS:-} 2>&1 | quiet | stamp >>"${dir}/log.txt"
  local trained=0
  [[ -d "${dir}/train/model" ]] && trained=1
  if ((trained)); then log "${name}: trained; evaluating"; else log "${name}: training FAILED (${dir}/log.txt)"; fi
  touch "${dir}/train_exit"  # after the log line: a follower's start is always logged after its leader's end
  ((trained)) || return 1
  # shellcheck disable=SC2086
  ${PYTHON} -m xtr_jax.eval --gin_file="${EVAL_GIN}" --gin.MODEL="'${dir}/train/model'" \
    --gin.OUTPUT_DIR="'${dir}/eval'" "--gin.xtr_eval.scoring=['xtr', 'colbert']" \
    "--gin.xtr_eval.index_backend='bruteforce'" --gin.xtr_eval.bm25=False --overwrite ${EVAL_ARGS:-} 2>&1 \
    | quiet | stamp >>"${dir}/log.txt"
  if [[ -f "${dir}/eval/summary.json" ]]; then log "${name}: evaluated"; else log "${name}: evaluation FAILED"; return 1; fi
}

for run in "$@"; do  # a rerun into the same OUT: no follower may take a previous run's end mark for its leader's
  rm -f "${OUT}/${run%%:*}/train_exit"
done
pids=()
for run in "$@"; do
  IFS=: read -r name experiment seed leader _ <<<"${run}"
  one "${name}" "${experiment}" "${seed}" "${leader}" &
  pids+=($!)
done
if [[ "${DEADLINE}" -gt 0 ]]; then
  while [[ -n "$(jobs -r)" && $(($(date +%s) - T0)) -lt ${DEADLINE} ]]; do sleep 5; done
  if [[ -n "$(jobs -r)" ]]; then
    log "deadline (${DEADLINE} s): stopping $(jobs -r | wc -l) runs"
    kill "${pids[@]}" 2>/dev/null
    pkill -TERM -f "xtr_jax\.(train|eval) .*${OUT}/" ; sleep 3; pkill -KILL -f "xtr_jax\.(train|eval) .*${OUT}/"
  fi
fi
status=0
for pid in "${pids[@]}"; do wait "${pid}" || status=1; done
log "done (exit ${status})"
exit "${status}"
