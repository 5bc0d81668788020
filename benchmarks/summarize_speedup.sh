#!/usr/bin/env bash
# On the lent GPU: summarize.py at batch 1 without and with prompt lookup on a model that
# copies (docs/PERFORMANCE.md's speculative decoding section). Trains the lead model
# (scripts/train_copying_checkpoint.py --task lead over LENGTH positions, default 512;
# STEPS, default 3000), builds a float16 all-plugins engine of it (--max_draft_len 15),
# runs summarize.py on the bundled articles (20, MAX_INPUT_LEN tokens of each, default
# 384; 100 new tokens) plain then with prompt lookup, twice (A B A B), and checks through
# the API that the two give the same tokens for the same prompts.
# (DEVICE=cpu runs it all on the CPU, slowly.)
# Usage: [LENGTH=832 MAX_INPUT_LEN=800] [STEPS=3000] [DEVICE=cuda] bash benchmarks/summarize_speedup.sh
set -uo pipefail
source "$(dirname "$0")/common.sh"
LENGTH=${LENGTH:-512}; MAX_INPUT_LEN=${MAX_INPUT_LEN:-384}; STEPS=${STEPS:-3000}; DEVICE=${DEVICE:-cuda}
ENGINE="$WORK/lead_engine"
SUMMARIZE=(--engine_dir "$ENGINE" --tokenizer data/demo_tokenizer --dataset_path data/cnn_dailymail_sample.jsonl
           --batch_size 1 --max_ite 20 --output_len 100 --max_input_len "$MAX_INPUT_LEN" --device "$DEVICE")
rm -rf "${WORK:?}/lead" "$ENGINE"
step python3 scripts/train_copying_checkpoint.py "$WORK/lead" --task lead --tokenizer_dir data/demo_tokenizer \
  --vocab_size 1024 --hidden_size 128 --length "$LENGTH" --batch 32 --steps "$STEPS" --device "$DEVICE"
step python3 build.py --model_dir "$WORK/lead" --output_dir "$ENGINE" --dtype float16 "${PLUGINS[@]}" \
  --use_gemm_plugin float16 --enable_context_fmha_fp32_acc --max_batch_size 1 --max_input_len "$MAX_INPUT_LEN" \
  --max_output_len 100 --max_draft_len 15 --paged_kv_cache --remove_input_padding --log_level warning
for run in 1 2; do
  for flags in "" "--speculative_decoding_mode prompt_lookup"; do
    step python3 summarize.py "${SUMMARIZE[@]}" $flags
  done
done
step python3 - "$ENGINE" "$MAX_INPUT_LEN" "$DEVICE" <<'EOF'
import sys
from glm_engine.api import SamplingConfig, SpeculativeConfig, load_session
from glm_engine.text.dataset import load_articles
from glm_engine.text.tokenizer import load_tokenizer
from summarize import summarize_prompt
engine, max_input_len, device = sys.argv[1], int(sys.argv[2]), sys.argv[3]
tokenizer = load_tokenizer("data/demo_tokenizer")
prompts = [summarize_prompt(record["article"], tokenizer, max_input_len)
           for record in load_articles("data/cnn_dailymail_sample.jsonl")[:20]]
outputs = []
for options in ({}, {"speculative": SpeculativeConfig("prompt_lookup")}):
    session = load_session(engine, device, **options)
    sampling = SamplingConfig(max_new_tokens=100, **session.model_config.end_options(1))
    outputs.append([session.generate([prompt], sampling)[0].token_ids for prompt in prompts])
print("identical tokens, plain and prompt lookup:", outputs[0] == outputs[1])
EOF
grep -h "^===\|tokens per second\|latency\|rouge1\|speculative\|identical" "$OUT/log.txt"
