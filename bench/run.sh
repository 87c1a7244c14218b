#!/usr/bin/env bash
# Side-by-side QLoRA training benchmark on the GPU machine: qfine, peft+bitsandbytes (bf16 autocast) and
# Unsloth, each in its own process, same harness (bench/train_bench.py), same random-init checkpoints.
#
#   bash bench/run.sh                        # the full matrix below
#   JOBS="qfine:1b:4x2048 hfac:1b:4x2048" bash bench/run.sh
#
# JOBS entries are impl:shape:configs with impl one of
#   qfine (fast path + full checkpointing), qfine-offload (the same, layer inputs in pinned host memory), qfine-nockpt (fast path, fused layers keep GEMM inputs only),
#   qfine-graph / qfine-nockpt-graph / qfine-offload-graph (the same, forward+backward replayed as a CUDA graph),
#   qfine-nockpt-graph-res (qfine-nockpt-graph with the first layers' weights kept dequantized in $RESIDENT_GIB,
#   default 4 GiB: train.resident_weights_gib), qfine-ref (plain peft path inside qfine), hfac (peft+bnb, bf16
#   autocast), unsloth.
# Needs .device/{common,qfine,peers} from ../shared/device/stage.sh peers. Results: $OUT/results.jsonl; the
# table with device and versions is printed and appended to docs/benchmarks.md (and $OUT/benchmarks-section.md).
# env: TOTAL seconds for the whole script (default 570), STEPS per config (default 14), PROFILE=1 to
# profile the last step of each qfine config (kernel tables in $OUT; PROFILE=cpu adds host time per op),
# QFINE_ARGS extra train_bench.py flags for the qfine runs (e.g. --sync-debug); DROPOUT the LoRA dropout of every run (default 0).
set -u
ROOT=$(pwd)
OUT=${OUT:-/tmp/qfine_bench}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false
TOTAL=${TOTAL:-570}; STEPS=${STEPS:-14}; PROFILE=${PROFILE:-0}
ALL="qfine-nockpt:8b:2x2048,4x2048,8x2048,1x8192 qfine:8b:2x2048,4x2048,8x2048,1x8192
hfac:8b:2x2048,4x2048,1x8192 unsloth:8b:2x2048,4x2048,8x2048,1x8192
qfine-nockpt:1b:2x2048,4x2048,8x2048,1x8192 qfine:1b:4x2048 hfac:1b:2x2048,4x2048,8x2048,1x8192
unsloth:1b:2x2048,4x2048,8x2048,1x8192"
JOBS=${JOBS:-$ALL}
START=$(date +%s); DEADLINE=$((START + TOTAL))
R=$OUT/results.jsonl
UW=/tmp/uwork; mkdir -p $UW   # unsloth writes unsloth_compiled_cache/ into its cwd
left() { echo $((DEADLINE - $(date +%s))); }
log() { echo "[$(( $(date +%s) - START ))s] $*"; }
QPATH=$ROOT/src:$ROOT/.device/common:$ROOT/.device/qfine
PPATH=$ROOT/.device/common:$ROOT/.device/peers

PYTHONPATH=$QPATH python3 $ROOT/bench/env_info.py | tee -a $OUT/env.txt
PYTHONPATH=$PPATH python3 -c "from importlib.metadata import version as v; print('PEERS', 'unsloth', v('unsloth'), 'trl', v('trl'))" | tee -a $OUT/env.txt

for job in $JOBS; do
  impl=${job%%:*}; rest=${job#*:}; shape=${rest%%:*}; cfgs=${rest#*:}
  model=/tmp/m_$shape
  if [ ! -f $model/config.json ]; then
    log "make $shape"; PYTHONPATH=$QPATH timeout $(left) python3 $ROOT/bench/make_model.py --shape $shape --out $model || continue
  fi
  L=$(left); [ $L -lt 60 ] && { log "skip $job: only ${L}s left"; continue; }
  case $impl in
    qfine) args="--impl qfine --autocast"; path=$QPATH ;;
    qfine-nockpt) args="--impl qfine --autocast --no-ckpt"; path=$QPATH ;;
    qfine-offload) args="--impl qfine --autocast --offload"; path=$QPATH ;;
    qfine-graph) args="--impl qfine --autocast --cuda-graph"; path=$QPATH ;;
    qfine-nockpt-graph) args="--impl qfine --autocast --no-ckpt --cuda-graph"; path=$QPATH ;;
    qfine-nockpt-graph-res) args="--impl qfine --autocast --no-ckpt --cuda-graph --resident-gib ${RESIDENT_GIB:-4}"; path=$QPATH ;;
    qfine-offload-graph) args="--impl qfine --autocast --offload --cuda-graph"; path=$QPATH ;;
    qfine-ref) args="--impl qfine --autocast --no-fast-path"; path=$QPATH ;;
    hfac) args="--impl hf --autocast"; path=$PPATH ;;
    unsloth) args="--impl unsloth"; path=$PPATH ;;
    *) log "unknown impl $impl"; continue ;;
  esac
  if [ "$PROFILE" != 0 ] && [ "${impl%%-*}" = qfine ]; then
    args="$args --profile $OUT/profile-$impl"; [ "$PROFILE" = cpu ] && args="$args --profile-cpu"
  fi
  [ "${impl%%-*}" = qfine ] && args="$args ${QFINE_ARGS:-}"
  log "run $impl $shape $cfgs (left ${L}s)"
  (cd $UW && PYTHONPATH=$path timeout $((L - 5)) python3 $ROOT/bench/train_bench.py $args --model $model --tag $shape \
     --configs $cfgs --dropout ${DROPOUT:-0} --steps $STEPS --deadline $((DEADLINE - 10)) --out $R) > $OUT/$impl-$shape.log 2>&1
  log "rc=$?"; grep -E "RESULT|fast path|Error|error|one step|SYNC|^  " $OUT/$impl-$shape.log | cut -c1-300 | tail -20
done
log done
# few files come back from the GPU machine: one log and one profile file
for f in $OUT/*.log; do [ -f "$f" ] && { echo "=== $f"; cat "$f"; }; done > $OUT/runs.txt && rm -f $OUT/*.log
for f in $OUT/profile-*; do [ -f "$f" ] && { echo "=== $f"; cat "$f"; }; done > $OUT/profiles.txt && rm -f $OUT/profile-*
# the table (with device and versions) goes into docs/benchmarks.md here and, since only $OUT comes back
# from the GPU machine, into $OUT/benchmarks-section.md too
if [ -f $R ]; then
  python3 $ROOT/bench/summarize.py $R --env $OUT/env.txt --append $OUT/benchmarks-section.md --title "${TITLE:-Side-by-side QLoRA throughput ($(date +%F))}"
  cat $OUT/benchmarks-section.md >> $ROOT/docs/benchmarks.md
fi
