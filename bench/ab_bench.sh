#!/usr/bin/env bash
# The same bench/run.sh rows for an older tree and this one, in one call, alternating old, new, old, new
# (the second round only while time is left): "within noise of before" measured on one machine.
#
#   bash bench/ab_bench.sh OLD_TREE [ROUNDS]     # OLD_TREE: a folder with the old src/ and bench/
#   JOBS="qfine-nockpt-graph:8b:2x2048" (default) as in bench/run.sh; SECONDS_EACH per run.sh call (default 170)
# Needs .device/{common,qfine} here (../shared/device/stage.sh). Rows: $OUT/{old,new}-N/results.jsonl,
# the summary table in $OUT/ab.txt.
old=$(cd "$1" && pwd); rounds=${2:-2}; new=$PWD
OUT=${OUT:-/tmp/qfine_ab}; mkdir -p "$OUT"
export JOBS=${JOBS:-"qfine-nockpt-graph:8b:2x2048"}
each=${SECONDS_EACH:-170}
ln -sfn "$new/.device" "$old/.device"   # the old tree's run.sh reads .device/ under its own root
start=$(date +%s)
for r in $(seq 1 "$rounds"); do
  for side in old new; do
    tree=$old; [ $side = new ] && tree=$new
    [ $(( $(date +%s) - start + each )) -gt ${BUDGET:-560} ] && { echo "skip $side-$r: out of time"; continue; }
    (cd "$tree" && OUT=$OUT/$side-$r TOTAL=$each bash bench/run.sh > "$OUT/$side-$r.out" 2>&1)
    echo "$side-$r: $(python3 -c "import json, sys; print([(r.get('impl'), r.get('bs'), r.get('seq'), r.get('tok_s'), r.get('peak_alloc_gib'), r.get('error')) for r in map(json.loads, open(sys.argv[1]))])" "$OUT/$side-$r/results.jsonl" 2>&1 | tail -1)"
  done
done | tee "$OUT/ab.txt"
