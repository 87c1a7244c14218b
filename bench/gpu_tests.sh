#!/usr/bin/env bash
# One pytest process (-m "not slow") over FILES on the GPU machine, with the packages that
# ../shared/device/stage.sh unpacked under .device/ and a tokenizer folder in .device/tok (the bundled
# model is not installed there). Log: $OUT/NAME.log; device and versions: $OUT/NAME.env.
#
#   bash bench/gpu_tests.sh NAME TIMEOUT_S FILES... [pytest flags]
#
# .device/qtest holds what only some tests need, kept apart so that a benchmark call can carry
# .device/peers instead (one call carries at most 64 MiB): optuna 5.0.0 with alembic, Mako, colorlog
# and SQLAlchemy (its compiled modules removed: it falls back to its Python ones), and rouge_score
# 0.1.2 (an sdist: `pip wheel --no-deps rouge_score==0.1.2`) with absl-py, nltk, regex, joblib,
# click and six.
name=$1; t=$2; shift 2
OUT=${OUT:-/tmp/qfine_gpu_tests}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD/.device/common:$PWD/.device/qfine:$PWD/.device/qtest:$PWD/tests
export QFINE_TEST_TOKENIZER=$PWD/.device/tok HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/$name.env" 2>&1
python3 -c "import torch, transformers, peft, triton; print(torch.__version__, transformers.__version__, peft.__version__, triton.__version__)" >> "$OUT/$name.env" 2>&1
cat "$OUT/$name.env"
timeout "$t" python3 -m pytest -q -p no:cacheprovider -m "not slow" -rfE --durations=25 "$@" > "$OUT/$name.log" 2>&1
echo "pytest rc=$?"
grep -E "passed|failed|error" "$OUT/$name.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/$name.log" | head -30
