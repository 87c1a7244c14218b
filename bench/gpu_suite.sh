#!/usr/bin/env bash
# The whole test suite (-m "not slow") on the GPU machine in one call: eight pytest processes side by
# side on the one GPU (16 cores: 2 threads each), each over a fixed group of test files, each under
# TIMEOUT_S. Logs: $OUT/suite-{a..h}.log (with --durations), device and versions in $OUT/suite.env.
# Needs .device/{common,qfine,qtest,tok} (../shared/device/stage.sh qtest; a tokenizer folder in .device/tok)
# and .device/studio, the studio's server (the machine has neither starlette nor uvicorn):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d W starlette uvicorn; unzip W/* there
#
#   bash bench/gpu_suite.sh [TIMEOUT_S]
t=${1:-540}
OUT=${OUT:-/tmp/qfine_gpu_suite}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD/.device/common:$PWD/.device/qfine:$PWD/.device/qtest:$PWD/.device/studio:$PWD/tests
export QFINE_TEST_TOKENIZER=$PWD/.device/tok HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false TORCHINDUCTOR_CACHE_DIR=/tmp/inductor OMP_NUM_THREADS=2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/suite.env" 2>&1
python3 -c "import torch, transformers, peft, triton; print(torch.__version__, transformers.__version__, peft.__version__, triton.__version__)" >> "$OUT/suite.env" 2>&1
cat "$OUT/suite.env"
A="test_fast_path test_gpu_fast test_gpu test_graphs test_dropout_kernel test_resident test_graphed_training"
E="test_stream test_prequantized test_config test_plan test_compat test_cli_startup test_python_api test_preference
"
B="test_sweep test_training test_resume test_monitoring test_distributed test_studio test_grpo"
D="test_multitask test_inference test_eval test_cli_errors test_fsutil test_data test_packing test_chitchat
   test_acceptance test_storage test_safe_stops test_studio_browser"
# the decode kernels' tests: each compiles many settings (NVRTC side by side on the cores, Triton one by one)
F="test_engine"
G="test_mma_kernel"
H="test_attn_decode test_tune_cache test_gemv_rows"
C="test_tasks test_export test_gguf_tokenizers test_gguf_sentencepiece test_modelfile test_gguf_lora test_deploy_llamacpp test_merge test_loading test_lora_variants test_qalora test_longlora test_adaptive
   test_adapter_management"
listed=$(echo $A $B $C $D $E $F $G $H | tr ' ' '\n' | sort)
present=$(ls tests/test_*.py | xargs -n1 basename | sed 's/\.py$//' | sort)
missing=$(comm -13 <(echo "$listed") <(echo "$present"))
[ -n "$missing" ] && echo "NOT IN ANY GROUP: $missing"
run() {  # run NAME FILES...
  local name=$1; shift
  local files=$(for f in "$@"; do echo tests/$f.py; done)
  local start=$(date +%s)
  # SIGINT: pytest still prints its summary and the durations of what ran
  timeout -s INT -k 20 "$t" python3 -m pytest -v -p no:cacheprovider -m "not slow" -rfE --durations=15 $files > "$OUT/suite-$name.log" 2>&1
  echo "group $name rc=$? in $(( $(date +%s) - start )) s: $(grep -E '(passed|failed|error)' "$OUT/suite-$name.log" | tail -1)"
}
run a $A & run b $B & run c $C & run d $D & run e $E & run f $F & run g $G & run h $H & wait
grep -hE "^(FAILED|ERROR)" "$OUT"/suite-*.log | head -40
