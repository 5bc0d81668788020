#!/usr/bin/env bash
# scratch: int4 engine, variants A (this tree) B (HEAD) C D E, bs 1 and 8, two rounds; tokens at bs1 per variant.
set -uo pipefail
source benchmarks/common.sh
declare -A DIRS=([A]=. [B]=/tmp/v_B [C]=/tmp/v_C [D]=/tmp/v_D [E]=/tmp/v_E [F]=/tmp/v_F)
for v in ${VARIANTS:-A B C D E}; do
  [ $v = A ] && continue
  src=.ab/pdl_$v/glm_engine; [ $v = B ] && src=.ab/head/glm_engine
  rm -rf /tmp/v_$v && mkdir -p /tmp/v_$v && cp -r . /tmp/v_$v/ && rm -rf /tmp/v_$v/glm_engine && cp -r $src /tmp/v_$v/glm_engine
done
PREC=${PREC:-int4}
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
      --output_json "$OUT/${PREC}_${v}_$round.json" 2>&1 | grep glm_engine | sed "s/^/$v$round /")
  done
done
for v in ${VARIANTS:-A B C D E}; do
  (cd ${DIRS[$v]} && python3 run.py --engine_dir "$WORK/e" --input_tokens "$WORK/p.csv" --max_output_len 64 \
    --output_csv "$OUT/tok_${PREC}_$v.csv" >/dev/null 2>&1)
  cmp -s "$OUT/tok_${PREC}_A.csv" "$OUT/tok_${PREC}_$v.csv" && echo "tokens $v == A" || echo "tokens $v differ from A"
done
