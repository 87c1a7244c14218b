#!/usr/bin/env bash
# One GPU call: the given test groups side by side (each "name:file,file,..." under TIMEOUT_S, verbose),
# then, alone on the GPU, bench/ab_bench.sh against OLD_TREE when one is given.
#
#   OLD_TREE=.device/old TIMEOUT_S=300 bash bench/gpu_call.sh b1:test_sweep b2:test_training,test_resume
OUT=${OUT:-/tmp/qfine_gpu_call}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD/.device/common:$PWD/.device/qfine:$PWD/.device/qtest:$PWD/tests
export QFINE_TEST_TOKENIZER=$PWD/.device/tok HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false TORCHINDUCTOR_CACHE_DIR=/tmp/inductor OMP_NUM_THREADS=4
t=${TIMEOUT_S:-300}
for group in "$@"; do
  name=${group%%:*}; files=$(echo "${group#*:}" | tr ',' '\n' | sed 's#^#tests/#; s#$#.py#')
  ( s=$(date +%s); timeout "$t" python3 -m pytest -v -p no:cacheprovider -m "not slow" -rfE --durations=10 $files \
      > "$OUT/tests-$name.log" 2>&1
    echo "group $name rc=$? in $(( $(date +%s) - s )) s: $(grep -E '(passed|failed|error)' "$OUT/tests-$name.log" | tail -1)" ) &
done
wait
grep -hE "^(FAILED|ERROR)" "$OUT"/tests-*.log | head -30
if [ -n "${OLD_TREE:-}" ]; then
  (export -n PYTHONPATH; OUT=$OUT/ab BUDGET=${AB_BUDGET:-260} bash bench/ab_bench.sh "$OLD_TREE" 2)
fi
