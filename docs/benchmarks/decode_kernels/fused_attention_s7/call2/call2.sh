#!/bin/bash
# Session 7 call 2: why the fused decode attention is slow: variants (rotary in the split kernel, old merge kernel;
# with/without the live-split guard; 4/8 warps) against the old chain and the old chain without its rotary kernel.
set -uo pipefail
source benchmarks/common.sh
step timeout 200 python3 docs/benchmarks/decode_kernels/fused_attention_s7/attention_micro.py /tmp/base_ccd4838 "$OUT/attention_micro2.json"
