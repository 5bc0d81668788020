#!/usr/bin/env bash
# On the lent GPU: greedy tokens and their log-probabilities of this tree (A) against
# VARIANT_DIR (a copy of glm_engine/, e.g. the previous commit's) on the dummy
# ChatGLM2-6B int4 and int8 weight-only engines (attention and layernorm plugins),
# one prompt per run (batch 1: the decode kernels a single user gets), four seeded
# random prompts of 64, 200, 17 and 500 tokens, 64 new tokens each. Prints per engine
# how many outputs are identical, where each first differs, and the largest
# log-probability difference before that point.
# Usage: bash benchmarks/compare_tokens.sh VARIANT_DIR
set -uo pipefail
VARIANT=$(realpath "${1:?usage: bash benchmarks/compare_tokens.sh VARIANT_DIR}")
source "$(dirname "$0")/common.sh"
make_variant "$VARIANT"
PROMPTS=$WORK/prompts
mkdir -p "$PROMPTS"
python3 -c "
import random
random.seed(0)
for i, n in enumerate((64, 200, 17, 500)):
    open('$PROMPTS/%d.csv' % i, 'w').write(','.join(str(random.randrange(100, 60000)) for _ in range(n)) + '\n')"
for precision in int4 int8; do
  build_engine "$WORK/$precision" "${PLUGINS[@]}" --use_weight_only --weight_only_precision $precision
  for i in 0 1 2 3; do
    for side in A B; do
      dir=.; [ $side = B ] && dir=/tmp/variant
      (cd $dir && python3 run.py --engine_dir "$WORK/$precision" --input_tokens "$PROMPTS/$i.csv" --max_output_len 64 \
        --output_csv "$OUT/${precision}_${side}_$i.csv" --output_log_probs "$OUT/${precision}_${side}_$i.json" \
        >/dev/null) || echo "run.py failed: $precision side $side prompt $i"
    done
  done
  python3 - "$OUT" $precision <<'PY'
import json, sys
out, precision = sys.argv[1:]
load = lambda side, i: (open(f"{out}/{precision}_{side}_{i}.csv").read().strip().split(","),
                        json.load(open(f"{out}/{precision}_{side}_{i}.json"))[0]["log_probs"])
identical, firsts, gap = 0, [], 0.0
for i in range(4):
    (tokens_a, log_a), (tokens_b, log_b) = load("A", i), load("B", i)
    first = next((j for j, (a, b) in enumerate(zip(tokens_a, tokens_b)) if a != b), None)
    identical += first is None and len(tokens_a) == len(tokens_b)
    firsts.append(first)
    gap = max([gap] + [abs(a - b) for a, b in list(zip(log_a, log_b))[:first]])
print(f"{precision}: {identical}/4 outputs identical, first differing token per prompt {firsts}, "
      f"largest |log-prob A - B| before it {gap:.2e}")
PY
  rm -rf "$WORK/$precision"
done
