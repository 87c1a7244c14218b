#!/usr/bin/env bash
# One GPU call: the engine's tests on the GPU (tests/test_engine.py, tests/test_grpo.py) while the
# Llama-3.1-8B-shape NF4 folder is written, then bench/generate_bench.py (qfine's engine and transformers'
# generate, batch 1 and 16). Needs .device/{common,qfine,qtest,tok}. Results: $OUT/generate.jsonl.
#
#   OUT=/tmp/out PEAK_GBS=3350 [PROFILE=1] bash bench/generate_call.sh
OUT=${OUT:-/tmp/qfine_generate}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$PWD/src:$PWD/.device/common:$PWD/.device/qfine:$PWD/.device/qtest:$PWD/tests
export QFINE_TEST_TOKENIZER=$PWD/.device/tok
model=/tmp/m_${SHAPE:-8b}_nf4
start=$(date +%s)
( timeout ${TEST_S:-200} python3 -m pytest -q -p no:cacheprovider -rfE ${TESTS:-tests/test_engine.py tests/test_grpo.py} \
    > "$OUT/tests.log" 2>&1; echo "tests rc=$? in $(( $(date +%s) - start )) s: $(tail -1 "$OUT/tests.log")" ) &
[ -f $model/config.json ] || python3 bench/make_model.py --shape ${SHAPE:-8b} --nf4 --out $model > "$OUT/make.log" 2>&1
echo "model ready in $(( $(date +%s) - start )) s"
wait
python3 bench/env_info.py > "$OUT/env.txt" 2>&1
if [ -n "${PROFILE:-}" ]; then  # where the decode step's time goes, and the 4-bit kernel's launch settings
  s=$(date +%s)
  (cd bench && timeout ${PROFILE_S:-200} python3 decode_profile.py --model $model ${PROFILE_ARGS:---tune}) \
    > "$OUT/profile.log" 2>&1
  echo "profile rc=$? in $(( $(date +%s) - s )) s"
  grep -h "^RESULT" "$OUT/profile.log" | sed 's/^RESULT //' > "$OUT/profile.jsonl"
  grep -E '"what": "(graph_step|step_kernels|tune_best|lora_down|bnb_layer|step)"' "$OUT/profile.jsonl"
fi
s=$(date +%s)
timeout ${BENCH_S:-300} python3 bench/generate_bench.py --model $model --peak-gbs ${PEAK_GBS:-0} ${ARGS:-} > "$OUT/bench.log" 2>&1
echo "bench rc=$? in $(( $(date +%s) - s )) s"
grep -h "^RESULT" "$OUT/bench.log" | sed 's/^RESULT //' > "$OUT/generate.jsonl"  # also in bench.log as it runs
cat "$OUT/generate.jsonl"; tail -3 "$OUT/bench.log"
grep -hE "^(FAILED|ERROR)" "$OUT/tests.log" | head
