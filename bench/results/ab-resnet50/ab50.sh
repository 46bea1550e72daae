#!/bin/bash
# resnet50, uint8 (SDK) and v2-pa (perf_analyzer), c1 and c16: old code (ac47eae) and new, alternated
for round in 1 2; do
for side in old new; do
  if [ $side = old ]; then dir=/work/wt-old; else dir=/work/main; fi
  cd $dir
  start=$(date +%s)
  .venv/bin/python -m bench run --models resnet50 --variants uint8,v2-pa --concurrency 1,16 --rounds 2 --batch-sizes 1,8,16 --results /tmp/runs/ab50-$side-$round --doc /tmp/runs/ab50-$side-$round.md --plots /tmp/runs/ab50-plots > /tmp/runs/ab50-$side-$round.log 2>&1
  echo "$side round $round: $(( $(date +%s) - start )) s"
  grep -E "c=1 |c=16 " /tmp/runs/ab50-$side-$round.log
done
done
