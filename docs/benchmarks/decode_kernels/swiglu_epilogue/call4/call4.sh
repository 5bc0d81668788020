#!/usr/bin/env bash
# scratch (session 4, call 4): GPU kernel tests (gemv incl. swiglu epilogue, swiglu, chained); A (this tree, SwiGLU
# fused) vs B (c778bea: model.py + glm_engine/) on the fp16 A+L+G+F32 and int4 (A+L) engines, batch 1 and 8, A B A B.
set -uo pipefail
source benchmarks/common.sh
(timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "gemv or swiglu or chained" 2>&1 | tail -4) > $OUT/kernel_tests.txt 2>&1
cat $OUT/kernel_tests.txt
make_variant .ab/s4/pre_swiglu/glm_engine && cp .ab/s4/pre_swiglu/model.py /tmp/variant/model.py
build_all_plugins_engine "$WORK/fp16" > /dev/null
build_engine "$WORK/int4" "${PLUGINS[@]}" --enable_context_fmha_fp32_acc --use_weight_only --weight_only_precision int4 > /dev/null
for round in 1 2; do
  for e in fp16 int4; do
    python3 benchmark.py --engine_dir "$WORK/$e" --batch_size 1 8 --input_len 1024 --output_len 64 \
      --output_json "$OUT/${e}_A$round.json" 2>&1 | grep glm_engine | sed "s/^/$e A$round /"
    (cd /tmp/variant && python3 benchmark.py --engine_dir "$WORK/$e" --batch_size 1 8 --input_len 1024 \
      --output_len 64 --output_json "/tmp/${e}_B$round.json" 2>&1 | grep glm_engine | sed "s/^/$e B$round /")
  done
done
cd /tmp && tar czf $OUT/b_runs.tgz *_B?.json
