#!/usr/bin/env bash
# scratch: kernel tests; fp16 A (this tree) / B (HEAD) at batch 1 2 8; gemv_libraries rows 1 8 (json to a file).
set -uo pipefail
source benchmarks/common.sh
(timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -3) > $OUT/kernel_tests.txt
cat $OUT/kernel_tests.txt
make_variant .ab/head6/glm_engine
build_all_plugins_engine "$WORK/fp16" > /dev/null
for round in 1 2; do
  python3 benchmark.py --engine_dir "$WORK/fp16" --batch_size 1 2 8 --input_len 1024 --output_len 64 \
    --output_json "$OUT/fp16_A$round.json" 2>&1 | grep glm_engine | sed "s/^/A$round /"
  (cd /tmp/variant && python3 benchmark.py --engine_dir "$WORK/fp16" --batch_size 1 2 8 --input_len 1024 \
    --output_len 64 --output_json "$OUT/fp16_B$round.json" 2>&1 | grep glm_engine | sed "s/^/B$round /")
done
rm -rf "$WORK/fp16"
timeout 250 python3 benchmarks/gemv_libraries.py --rows 1 8 --json $OUT/gemv_libraries.json > $OUT/gemv_libraries.txt 2>&1
grep -A40 "per layer us" $OUT/gemv_libraries.txt
