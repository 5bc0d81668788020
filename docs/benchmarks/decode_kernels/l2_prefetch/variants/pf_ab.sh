#!/usr/bin/env bash
# scratch: L2-prefetch variants. A = this tree; B/C/D/E = .ab/pf_X (glm_engine + model.py) over this tree.
# PREC engine, VARIANTS, two rounds of benchmark.py bs 1 8 (1024 in / 64 out); greedy tokens per variant; profile of A.
set -uo pipefail
source benchmarks/common.sh
declare -A DIRS=([A]=.)
for v in ${VARIANTS:-A B C D E}; do
  [ $v = A ] && continue
  DIRS[$v]=/tmp/v_$v
  rm -rf /tmp/v_$v && mkdir -p /tmp/v_$v && cp -r . /tmp/v_$v/ && rm -rf /tmp/v_$v/glm_engine /tmp/v_$v/model.py \
    && cp -r .ab/pf_$v/glm_engine .ab/pf_$v/model.py /tmp/v_$v/
done
for PREC in ${PRECS:-int4}; do
  rm -rf "$WORK/e"
  if [ $PREC = fp16 ]; then build_all_plugins_engine "$WORK/e"; else
    build_engine "$WORK/e" "${PLUGINS[@]}" --enable_context_fmha_fp32_acc --use_weight_only --weight_only_precision $PREC; fi
  python3 -c "
import random
random.seed(0)
open('$WORK/p.csv','w').write(','.join(str(random.randrange(100,60000)) for _ in range(200))+'\n')"
  for round in 1 2; do
    for v in ${VARIANTS:-A B C D E}; do
      (cd ${DIRS[$v]} && python3 benchmark.py --engine_dir "$WORK/e" --batch_size 1 8 --input_len 1024 --output_len 64 \
        --output_json "$OUT/${PREC}_${v}_$round.json" 2>&1 | grep glm_engine | sed "s/^/$PREC $v$round /")
    done
  done
  for v in ${VARIANTS:-A B C D E}; do
    (cd ${DIRS[$v]} && python3 run.py --engine_dir "$WORK/e" --input_tokens "$WORK/p.csv" --max_output_len 64 \
      --output_csv "$OUT/tok_${PREC}_$v.csv" >/dev/null 2>&1)
    cmp -s "$OUT/tok_${PREC}_A.csv" "$OUT/tok_${PREC}_$v.csv" && echo "$PREC tokens $v == A" || echo "$PREC tokens $v differ from A"
  done
  [ -n "${PROFILE:-}" ] && python3 benchmarks/profile_decode.py "$WORK/e" --json "$OUT/profile_${PREC}_A.json" > "$OUT/profile_${PREC}_A.txt" 2>&1
done
