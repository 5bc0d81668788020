#!/usr/bin/env bash
# The demo: sets up .venv, trains the small demo tokenizer, builds a dummy-weight
# engine (ChatGLM2-6B shape on a CUDA GPU, a tiny one on the CPU), generates with
# run.py and summarizes the bundled cnn_dailymail sample with summarize.py,
# engine and Hugging Face side by side. Everything lands in demo_output/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
OUT=demo_output
$PY scripts/make_demo_tokenizer.py "$OUT/tokenizer" >/dev/null
if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "CUDA GPU found: dummy ChatGLM2-6B engine, float16, with the plugins (Triton kernels, CUDA graphs)"
  SHAPE=(--dtype float16 --use_gpt_attention_plugin float16 --use_layernorm_plugin float16
         --use_gemm_plugin float16)
  HF_DTYPE=fp16
else
  echo "No CUDA GPU: tiny dummy engine (2 layers, hidden 256), float32, on the CPU"
  SHAPE=(--dtype float32 --n_layer 2 --n_embd 256 --n_head 8 --multi_query_group_num 2 --inter_size 512
         --vocab_size 1024)
  HF_DTYPE=fp32
fi
$PY build.py --output_dir "$OUT/engine" --tokenizer_dir "$OUT/tokenizer" --random_seed 0 \
  --max_batch_size 4 --max_input_len 800 --max_output_len 64 --log_level warning "${SHAPE[@]}"
$PY run.py --engine_dir "$OUT/engine" --max_output_len 32
$PY summarize.py --engine_dir "$OUT/engine" --dataset_path data/cnn_dailymail_sample.jsonl --test_hf \
  --data_type "$HF_DTYPE" --batch_size 4 --max_ite 2 --output_len 32 --max_input_len 800 --log_level warning
echo "Random weights print random text; build.py --model_dir <ChatGLM2 checkpoint> gives the real model."
