#!/usr/bin/env bash
# One GPU call: the DPO benchmark (bench/dpo_bench.py) on the Llama-3.1-8B shape, qfine first, then TRL
# and Unsloth (each in its own process with the peers' packages), then qfine at lower memory.
# Needs .device/{common,qfine,peers} (../shared/device/stage.sh peers). Results: $OUT/dpo.jsonl.
#
#   SHAPE=8b EACH=200 bash bench/dpo_call.sh
OUT=${OUT:-/tmp/qfine_dpo}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
export TOKENIZERS_PARALLELISM=false
QPATH=$PWD/src:$PWD/.device/common:$PWD/.device/qfine
PPATH=$PWD/.device/common:$PWD/.device/peers
model=/tmp/m_${SHAPE:-8b}; each=${EACH:-200}
start=$(date +%s)
[ -f $model/config.json ] || PYTHONPATH=$QPATH python3 bench/make_model.py --shape ${SHAPE:-8b} --out $model > "$OUT/make.log" 2>&1
echo "model ready in $(( $(date +%s) - start )) s"
PYTHONPATH=$QPATH python3 bench/env_info.py > "$OUT/env.txt" 2>&1
run() {  # run NAME PATH ARGS...
  local name=$1 path=$2; shift 2
  local s=$(date +%s)
  (cd /tmp && PYTHONPATH=$path timeout "$each" python3 "$OLDPWD/bench/dpo_bench.py" --model $model "$@") > "$OUT/$name.log" 2>&1
  grep -h "^RESULT" "$OUT/$name.log" | sed 's/^RESULT //' >> "$OUT/dpo.jsonl"
  echo "$name ($(( $(date +%s) - s )) s): $(grep -h '^RESULT' "$OUT/$name.log" | cut -c1-400 || tail -2 "$OUT/$name.log")"
}
for job in ${JOBS:-qfine trl unsloth qfine-offload qfine-nockpt}; do
  case $job in
    qfine) run qfine "$QPATH" --impl qfine ;;
    qfine-offload) run qfine-offload "$QPATH" --impl qfine --offload ;;
    qfine-nockpt) run qfine-nockpt "$QPATH" --impl qfine --no-ckpt ;;
    qfine-precompute) run qfine-precompute "$QPATH" --impl qfine --mode dpo-precompute ;;
    qfine-sft) run qfine-sft "$QPATH" --impl qfine --mode sft ;;
    trl) run trl "$PPATH" --impl trl ;;
    unsloth) run unsloth "$PPATH" --impl unsloth ;;
  esac
done
