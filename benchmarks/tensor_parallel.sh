#!/usr/bin/env bash
# On a lent 4-GPU host (TP_SIZES="1 2" picks the sizes): the tensor-parallel table of docs/PERFORMANCE.md. Dummy
# ChatGLM2-6B fp16 A+L+G+F32 engines at 1, 2 and 4 ranks (2 and 4 built with
# --parallel_build): batch 1 and 8, 1024 tokens in and 64 out, logits against
# GlmForCausalLM fp32 (TP1, TP2); HF eager in the TP1 run; greedy tokens of TP2 and TP4 against
# TP1 through run.py. Ranks are started by hand under a time limit (as torchrun
# would: RANK, WORLD_SIZE, LOCAL_RANK), so that a hang cannot eat the call.
set -uo pipefail
source "$(dirname "$0")/common.sh"
ranks() {  # ranks N SECONDS command...
  local n=$1 limit=$2; shift 2
  echo "=== $n rank(s): $*"
  for ((r = 0; r < n; r++)); do
    MASTER_ADDR=127.0.0.1 MASTER_PORT=29512 RANK=$r WORLD_SIZE=$n LOCAL_RANK=$r LOCAL_WORLD_SIZE=$n \
      timeout -s ABRT "$limit" python3 -X faulthandler "$@" > "$OUT/rank$r.out" 2> "$OUT/rank$r.err" &
  done
  wait
  grep -v "it/s\]\|B/s\]" "$OUT/rank0.out" | tee -a "$OUT/log.txt"
  for ((r = 0; r < n; r++)); do grep -h "error\|Error\|Fatal" "$OUT/rank$r.err" | head -3; done
}
B=(--batch_size 1 8 --input_len 1024 --output_len 64 --repeats 3)
python3 -c "import random; r = random.Random(7); print('\n'.join(','.join(str(r.randrange(60000)) for _ in range(32)) for _ in range(8)))" > "$WORK/prompts.csv"
for n in ${TP_SIZES:-1 2 4}; do
  extra=(); [ $n -gt 1 ] && extra=(--world_size $n --parallel_build)
  build_engine "$WORK/tp$n" "${PLUGINS[@]}" --use_gemm_plugin float16 --enable_context_fmha_fp32_acc "${extra[@]}"
  hf=(); [ $n -eq 1 ] && hf=(--hf)
  accuracy=(); [ $n -le 2 ] && accuracy=(--accuracy)
  ranks $n 240 benchmark.py --engine_dir "$WORK/tp$n" "${B[@]}" "${hf[@]}" "${accuracy[@]}" --output_json "$OUT/tp$n.json"
  ranks $n 120 run.py --engine_dir "$WORK/tp$n" --input_tokens "$WORK/prompts.csv" --max_output_len 64 \
    --output_csv "$OUT/greedy_tp$n.csv"
  rm -rf "$WORK/tp$n"
done
python3 - "$OUT" <<'PY'
import csv, json, sys
out = sys.argv[1]
rows = lambda n: [list(map(int, r)) for r in csv.reader(open(f"{out}/greedy_tp{n}.csv"))]
for n in (2, 4):
    try:
        a, b = rows(1), rows(n)
        same = sum(x == y for x, y in zip(a, b))
        first = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x)) for x, y in zip(a, b)]
        print(f"TP{n} vs TP1 greedy: {same}/{len(a)} outputs identical, first divergence at {first}")
    except OSError as error:
        print(f"TP{n}: {error}")
for n in (1, 2, 4):
    try:
        result = json.load(open(f"{out}/tp{n}.json"))
    except OSError as error:
        print(f"TP{n}: {error}"); continue
    for row in result["rows"]:
        print(f"TP{n} {row['side']:<10} bs{row['batch_size']}: prefill {row['prefill_ms']:.2f} ms, decode "
              f"{row['decode_ms_per_step']:.3f} ms/step = {row['decode_tokens_per_s']:.1f} tok/s, peak {row['peak_gib']:.2f} GiB")
    print(f"TP{n} logits rel err vs HF fp32: {result.get('logits_relative_error_vs_hf_fp32')}, start-up {result.get('startup_s'):.1f} s")
PY
