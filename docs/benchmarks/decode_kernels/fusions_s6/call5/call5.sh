#!/bin/bash
# Paths as stored: /tmp/base_<rev> and /tmp/variant_<name> are `git archive <rev>` trees (call 4: variants.txt;
# call 5: variant_pre_release = 666513e), made beside the run; the scratch scripts sit next to this file.
# Session 6 call 5: HEAD (SwiGLU epilogue) with the Hugging Face baseline (int4), batch-1 profiles of int4 and int8,
# int8 latency, and the paged KV pool size after the shuffle (HEAD, which frees the loaded weights, vs 666513e).
set -uo pipefail
source benchmarks/common.sh
B=(--batch_size 1 8 --input_len 1024 --output_len 64)
for bits in int4 int8; do
  build_engine "$WORK/$bits" "${PLUGINS[@]}" --enable_context_fmha_fp32_acc --use_weight_only --weight_only_precision $bits | grep -v "^===" | tail -3
  hf=(); [ $bits = int4 ] && hf=(--hf)
  python3 benchmark.py --engine_dir "$WORK/$bits" "${B[@]}" "${hf[@]}" --output_json "$OUT/${bits}_hf.json" 2>&1 | grep "glm_engine\|hf_\|rror\|start" | sed "s/^/$bits /"
  python3 benchmarks/profile_decode.py "$WORK/$bits" --json "$OUT/profile_$bits.json" 2>&1 | tail -22 | sed "s/^/$bits /"
  rm -rf "$WORK/$bits"
done
build_engine "$WORK/paged" "${PLUGINS[@]}" --enable_context_fmha_fp32_acc --use_weight_only --weight_only_precision int4 --paged_kv_cache | grep -v "^===" | tail -3
for v in head pre_release; do
  dir=.; [ $v != head ] && dir=/tmp/variant_$v
  (cd $dir && python3 -c "import logging, sys; logging.basicConfig(level=logging.INFO); sys.path.insert(0, '.'); from model import load_session; s = load_session('$WORK/paged'); print('pool GiB', s.runner.kv_cache.nbytes / 2**30)" 2>&1 | grep "KV cache\|pool\|rror" | sed "s/^/paged $v /")
done
