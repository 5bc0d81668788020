#!/usr/bin/env bash
# On the lent GPU: docs/PERFORMANCE.md's "OpenAI-compatible server" table. The
# 512-request workload (inputs 400-800, exactly 100 out) all at once and at 40
# requests/s, in process and through serve.py over HTTP, each without and with
# chunked prefill; HF eager static batches as the baseline of the same run.
set -uo pipefail
source "$(dirname "$0")/common.sh"
build_inflight_engine "$WORK/ifb"
LOAD=(--num_requests 512 --input_len_range 400 800 --output_len 100)
CHUNKED=(--enable_chunked_context --max_tokens_per_step "${CHUNK_TOKENS:-4096}")
inproc() {  # NAME [benchmark.py flags]
  local name=$1; shift
  step python3 benchmark.py --engine_dir "$WORK/ifb" "${LOAD[@]}" --output_json "$OUT/$name.json" "$@"
}
# A server on port 8011 for the HTTP runs: serve NAME [serve.py flags]; unserve NAME.
serve() {
  local name=$1; shift
  python3 serve.py --engine_dir "$WORK/ifb" --port 8011 --log_level warning "$@" >"$OUT/serve_$name.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 240); do curl -sf http://127.0.0.1:8011/health >/dev/null && break; sleep 0.5; done
  echo "server up after start: $(curl -s http://127.0.0.1:8011/health)"
}
unserve() {
  curl -s http://127.0.0.1:8011/metrics >"$OUT/metrics_$1.txt"
  echo "health at the end: $(curl -s http://127.0.0.1:8011/health)"
  kill -TERM "$SERVER"; wait "$SERVER"; echo "=== server exit $?"
}
# CPU seconds of the server's processes (HTTP side, engine), to tell which side is busy.
server_cpu() { ps -o pid=,times=,args= --ppid "$SERVER" -p "$SERVER" | grep -v resource_tracker | cut -c1-90; }
TIMEFORMAT="load generator: %R s wall, %U s user, %S s sys"
http() {  # NAME [benchmark.py flags]
  local name=$1; shift
  time step python3 benchmark.py --engine_dir "$WORK/ifb" "${LOAD[@]}" --server_url http://127.0.0.1:8011 \
    --output_json "$OUT/$name.json" "$@"
  server_cpu
}
# The engine's host thread pool, as before (all cores) against the one thread it now takes on a GPU.
OMP_NUM_THREADS=$(nproc) inproc inproc_throughput_all_threads --mode throughput
inproc inproc_throughput --mode throughput --hf --hf_num_requests 128 --hf_batch_size 32
inproc inproc_throughput_chunked --mode throughput "${CHUNKED[@]}"
inproc inproc_rate40 --mode rate --request_rate 40
inproc inproc_rate40_chunked --mode rate --request_rate 40 "${CHUNKED[@]}"
serve plain
http http_warm --mode throughput --num_requests 64
http http_throughput --mode throughput
http http_rate40 --mode rate --request_rate 40
unserve plain
serve chunked "${CHUNKED[@]}"
http http_warm_chunked --mode throughput --num_requests 64
http http_throughput_chunked --mode throughput
http http_rate40_chunked --mode rate --request_rate 40
unserve chunked
grep -h "requests in" "$OUT/log.txt"
