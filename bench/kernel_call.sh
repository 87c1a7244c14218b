#!/usr/bin/env bash
# One GPU call for the 4-bit decode product: bench/gemv_bench.py (every setting at the 8B projection
# shapes, against bitsandbytes and a copy's bandwidth), the engine's GPU tests while the Llama-3.1-8B-shape
# NF4 folder is written, then bench/generate_bench.py (engine and transformers' generate, batch 1 and 16)
# unless SKIP_GENERATE, and with GRPO=1 qfine's GRPO step (bench/grpo_bench.py). SKIP_GEMV skips the first
# part; TESTS_AFTER runs the tests last, so that they do not share the GPU with the timings; PROFILE=1
# profiles the decode step at batch 1 (bench/decode_profile.py) with plain launches (an early launch's
# kernel time would include its wait for the kernel before; PROFILE_PDL=1 keeps them); PDL_AB=1 runs the
# engine again without programmatic dependent launches (QFINE_PDL=0) after the first bench;
# FETCH_AB="L2B=256;AHEAD=4" runs it again with those ways of requesting the weights offered to the tuner
# (QFINE_MMA_FETCH; FETCH_PDL=0: without early launches); AB_ENV="QFINE_ATTN_DOT=1;X=1 Y=2" runs it again
# under each ";"-separated set of switches (AB_REPEAT timings each); ATTN=1 times every attention setting alone (bench/attn_bench.py).
# The tests stop at the first failure and print it (TEST_ARGS, default "-x --tb=short"), in TEST_WORKERS (6)
# pytest-xdist processes.
# Needs .device/{common,qfine,qtest,tok}. Results: $OUT/{gemv,generate}.jsonl, logs, $OUT/env.txt.
#
#   OUT=/tmp/out GEMV_ARGS="--sweep 1 64" bash bench/kernel_call.sh
OUT=${OUT:-/tmp/qfine_kernel}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$PWD/src:$PWD/.device/common:$PWD/.device/qfine:$PWD/.device/qtest:$PWD/tests
export QFINE_TEST_TOKENIZER=$PWD/.device/tok
model=/tmp/m_${SHAPE:-8b}_nf4
python3 bench/env_info.py > "$OUT/env.txt" 2>&1  # device and versions, beside the results
if [ -z "${SKIP_GEMV:-}" ]; then
s=$(date +%s)
(cd bench && timeout ${GEMV_S:-230} python3 gemv_bench.py ${GEMV_ARGS:-}) > "$OUT/gemv.log" 2>&1
echo "gemv rc=$? in $(( $(date +%s) - s )) s"
grep -h "^RESULT" "$OUT/gemv.log" | sed 's/^RESULT //' > "$OUT/gemv.jsonl"
sed -n '/^copy bandwidth/,$p' "$OUT/gemv.log" | grep -v "^RESULT" | head -60
grep -c '"wrong"\|"error"' "$OUT/gemv.jsonl"; grep -h '"wrong"\|"error"' "$OUT/gemv.jsonl" | head -3
fi
run_tests() {
  local s=$(date +%s)
  # pytest-xdist (on the GPU machine): TEST_WORKERS processes side by side, their compiles on the 16 cores
  timeout -s INT -k 20 ${TEST_S:-240} python3 -m pytest -q -p no:cacheprovider -rfE --durations=12 \
    -n ${TEST_WORKERS:-6} ${TEST_ARGS:--x --tb=short} -m gpu \
    ${TESTS:-tests/test_engine.py tests/test_gemv_rows.py tests/test_mma_kernel.py tests/test_attn_decode.py \
    tests/test_tune_cache.py} > "$OUT/tests.log" 2>&1
  echo "tests rc=$? in $(( $(date +%s) - s )) s: $(tail -1 "$OUT/tests.log")"
  grep -hE "^(FAILED|ERROR)" "$OUT/tests.log" | head -5; grep -B2 -A25 "^_____" "$OUT/tests.log" | head -60
}
s=$(date +%s)
[ -n "${TESTS_AFTER:-}" ] || run_tests &
[ -f $model/config.json ] || python3 bench/make_model.py --shape ${SHAPE:-8b} --nf4 --out $model > "$OUT/make.log" 2>&1
echo "model ready in $(( $(date +%s) - s )) s"
wait
if [ -z "${SKIP_GENERATE:-}" ]; then
s=$(date +%s)
timeout ${BENCH_S:-220} python3 bench/generate_bench.py --model $model ${GEN_ARGS:---repeat 2} > "$OUT/bench.log" 2>&1
echo "bench rc=$? in $(( $(date +%s) - s )) s"
grep -h "^RESULT" "$OUT/bench.log" | sed 's/^RESULT //' > "$OUT/generate.jsonl"
grep -v tuned "$OUT/generate.jsonl"; grep tuned "$OUT/generate.jsonl" | cut -c1-300; tail -3 "$OUT/bench.log"
fi
if [ -n "${PDL_AB:-}" ]; then  # the engine again without programmatic dependent launches (QFINE_PDL=0)
s=$(date +%s)
QFINE_PDL=0 timeout ${PDL_S:-150} python3 bench/generate_bench.py --model $model --impl qfine --batch 1 --repeat 2 \
  > "$OUT/bench-pdl.log" 2>&1
echo "bench without PDL rc=$? in $(( $(date +%s) - s )) s"
grep -h "^RESULT" "$OUT/bench-pdl.log" | sed 's/^RESULT //' > "$OUT/generate-pdl.jsonl"
grep -v tuned "$OUT/generate-pdl.jsonl"; tail -3 "$OUT/bench-pdl.log"
fi
if [ -n "${FETCH_AB:-}" ]; then  # the engine again, the tuner also timing each way of requesting the weights
s=$(date +%s)
QFINE_PDL=${FETCH_PDL:-1} QFINE_MMA_FETCH="$FETCH_AB" timeout ${FETCH_S:-200} python3 bench/generate_bench.py --model $model --impl qfine \
  --batch 1 --repeat 2 > "$OUT/bench-fetch.log" 2>&1
echo "bench with QFINE_MMA_FETCH=$FETCH_AB QFINE_PDL=${FETCH_PDL:-1} rc=$? in $(( $(date +%s) - s )) s"
grep -h "^RESULT" "$OUT/bench-fetch.log" | sed 's/^RESULT //' > "$OUT/generate-fetch.jsonl"
grep -v tuned "$OUT/generate-fetch.jsonl"; grep tuned "$OUT/generate-fetch.jsonl" | cut -c1-300; tail -3 "$OUT/bench-fetch.log"
fi
if [ -n "${AB_ENV:-}" ]; then  # the engine again with each set of switches, e.g. AB_ENV="QFINE_ATTN_DOT=1;A=1 B=2"
IFS=';' read -ra sets <<< "$AB_ENV"
for i in "${!sets[@]}"; do
s=$(date +%s)
env ${sets[$i]} timeout ${AB_S:-150} python3 bench/generate_bench.py --model $model --impl qfine --batch 1 \
  --repeat ${AB_REPEAT:-2} > "$OUT/bench-ab$i.log" 2>&1
echo "bench with ${sets[$i]} rc=$? in $(( $(date +%s) - s )) s"
grep -h "^RESULT" "$OUT/bench-ab$i.log" | sed 's/^RESULT //' | sed "s/^{/{\"switches\": \"${sets[$i]}\", /" \
  >> "$OUT/generate-ab.jsonl"
grep -h "^RESULT" "$OUT/bench-ab$i.log" | grep -v tuned | cut -c1-400; tail -2 "$OUT/bench-ab$i.log"
done
fi
if [ -n "${ATTN:-}" ]; then  # every attention setting alone (bench/attn_bench.py)
  s=$(date +%s)
  timeout ${ATTN_S:-90} python3 bench/attn_bench.py ${ATTN_ARGS:-} > "$OUT/attn.log" 2>&1
  echo "attention bench rc=$? in $(( $(date +%s) - s )) s"
  grep -h "^RESULT" "$OUT/attn.log" | sed 's/^RESULT //' > "$OUT/attn.jsonl"; grep -v "^RESULT" "$OUT/attn.log" | tail -8
fi
if [ -n "${PROFILE:-}" ]; then  # the decode step's kernels at batch 1 (bench/decode_profile.py)
  s=$(date +%s)
  (cd bench && QFINE_PDL=${PROFILE_PDL:-0} timeout ${PROFILE_S:-90} python3 decode_profile.py --model $model --rows 1) \
    > "$OUT/profile.log" 2>&1
  echo "profile rc=$? in $(( $(date +%s) - s )) s"
  grep -h "^RESULT" "$OUT/profile.log" | cut -c1-300; grep -A32 "Self CUDA" "$OUT/profile.log" | cut -c1-160 | head -34
fi
if [ -n "${GRPO:-}" ]; then  # qfine's GRPO step on the same folder (bench/grpo_bench.py; peers: bench/grpo_call.sh)
  s=$(date +%s)
  (cd /tmp && timeout ${GRPO_S:-150} python3 "$OLDPWD/bench/grpo_bench.py" --impl qfine --model $model --steps 3) \
    > "$OUT/grpo.log" 2>&1
  echo "grpo rc=$? in $(( $(date +%s) - s )) s"
  grep -h "^RESULT" "$OUT/grpo.log" | sed 's/^RESULT //' | tee "$OUT/grpo.jsonl"; tail -2 "$OUT/grpo.log"
fi
[ -z "${TESTS_AFTER:-}" ] || run_tests  # after the timings, so that they do not share the GPU
