#!/bin/bash
# Session 5 call 1: GEMV num_warps variants (cold/hot), ncu on the one-row GEMVs.
source benchmarks/common.sh
python3 .ab/s5/micro.py $OUT/micro.json 2>&1 | tee $OUT/micro.txt
for spec in 4:up 4:down 4:qkv 8:up 0:up; do
  tag=${spec/:/_}
  timeout 120 ncu --clock-control none --kernel-name regex:_gemv_kernel --launch-skip 1 --launch-count 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
    --section SchedulerStats --section LaunchStats python3 .ab/s5/ncu_one.py $spec > $OUT/ncu_$tag.txt 2>&1
  echo "== $spec"; grep -E "Duration|DRAM Throughput|Memory Throughput|Issue Slots Busy|Achieved Occupancy|Registers Per|Warp Cycles Per Issued|Issued Ipc|No Eligible|Theoretical Occ|Block Limit" $OUT/ncu_$tag.txt | head -20
done
tar -cf $OUT/ncu.tar -C $OUT $(cd $OUT; ls ncu_*.txt) && rm $OUT/ncu_*.txt
