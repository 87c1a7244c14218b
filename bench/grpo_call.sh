#!/usr/bin/env bash
# One GPU call: the GRPO step benchmark (bench/grpo_bench.py) on the Llama-3.1-8B-shape NF4 folder: qfine, then
# TRL and Unsloth, each in its own process (the peers with .device/peers, never mixed with qfine's packages).
# Needs .device/{common,qfine,peers}. Results: $OUT/grpo.jsonl.
#
# EACH: seconds per job; UNSLOTH_S: Unsloth's instead (its start-up patches and compiles for minutes).
# A job may carry switches for its process: "qfine:QFINE_MMA_ROWS=64" (several: comma-separated).
#
#   OUT=/tmp/out EACH=150 UNSLOTH_S=330 JOBS="qfine trl unsloth" bash bench/grpo_call.sh
OUT=${OUT:-/tmp/qfine_grpo}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
export TOKENIZERS_PARALLELISM=false
QPATH=$PWD/src:$PWD/.device/common:$PWD/.device/qfine:$PWD/bench
PPATH=$PWD/.device/common:$PWD/.device/peers:$PWD/bench
model=/tmp/m_${SHAPE:-8b}_nf4; each=${EACH:-150}
start=$(date +%s)
[ -f $model/config.json ] || PYTHONPATH=$QPATH python3 bench/make_model.py --shape ${SHAPE:-8b} --nf4 --out $model > "$OUT/make.log" 2>&1
echo "model ready in $(( $(date +%s) - start )) s"
PYTHONPATH=$QPATH python3 bench/env_info.py > "$OUT/env.txt" 2>&1
for entry in ${JOBS:-qfine trl unsloth}; do
  job=${entry%%:*}; switches=; [ "$job" = "$entry" ] || switches=$(echo "${entry#*:}" | tr ',' ' ')
  log="$OUT/$(echo "$entry" | tr ':,=' '___').log"
  path=$QPATH; [ $job = qfine ] || path=$PPATH
  limit=$each; [ $job = unsloth ] && limit=${UNSLOTH_S:-$each}
  s=$(date +%s)
  (cd /tmp && env $switches PYTHONPATH=$path timeout "$limit" python3 "$OLDPWD/bench/grpo_bench.py" --impl $job \
    --model $model ${ARGS:-}) > "$log" 2>&1
  grep -h "^RESULT" "$log" | sed 's/^RESULT //' | sed "s/^{/{\"switches\": \"$switches\", /" >> "$OUT/grpo.jsonl"
  echo "$entry ($(( $(date +%s) - s )) s): $(grep -h '^RESULT' "$log" | cut -c1-500 || tail -3 "$log")"
done
