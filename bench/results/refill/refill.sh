#!/bin/bash
# resnet50, uint8 (SDK) and v2-pa (perf_analyzer), c1 and c16, after the refill fix; same command as ab50.sh
cd /work/main
for round in 1 2; do
  .venv/bin/python -m bench run --models resnet50 --variants uint8,v2-pa --concurrency 1,16 --rounds 2 --batch-sizes 1,8,16 --results /tmp/runs/refill-$round --doc /tmp/runs/refill-$round.md --plots /tmp/runs/refill-plots > /tmp/runs/refill-$round.log 2>&1
  echo "refill round $round"
  grep -E "c=1 |c=16 " /tmp/runs/refill-$round.log
done
