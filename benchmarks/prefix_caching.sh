#!/usr/bin/env bash
# On the lent GPU: docs/PERFORMANCE.md's prefix caching and structured output table, on
# the in-flight engine with --max_input_len 3072: a multi-turn chat (256 conversations of
# 4 turns after a 2,000-token system prompt, 40 requests/s) with and without prefix
# caching; the 512-request run without and with caching, and with response_format
# json_object on every request (needs llguidance: carry its wheel in .whl/).
set -uo pipefail
source "$(dirname "$0")/common.sh"
build_inflight_engine "$WORK/ifb" --max_input_len 3072
CHAT=(--mode rate --request_rate 40 --num_requests 1024 --turns 4 --shared_prefix_len 2000 --input_len_range 50 150
      --output_len 64)
LOAD=(--mode throughput --num_requests 512 --input_len_range 400 800 --output_len 100)
run() { local name=$1; shift; step python3 benchmark.py --engine_dir "$WORK/ifb" "$@" --output_json "$OUT/$name.json"; }
run chat_cached "${CHAT[@]}" --enable_prefix_caching
run chat_plain "${CHAT[@]}"
run load_plain "${LOAD[@]}"
run load_cached "${LOAD[@]}" --enable_prefix_caching
run load_json_object "${LOAD[@]}" --response_format '{"type": "json_object"}'
grep -h "^glm_engine" "$OUT/log.txt"
