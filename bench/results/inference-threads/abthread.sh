#!/bin/bash
# before (executor hand-off, /work/wt-before) vs after (inference threads, /work/main), alternated
for round in 1 2; do
for side in before after; do
  if [ $side = before ]; then dir=/work/wt-before; else dir=/work/main; fi
  cd $dir
  /work/main/.venv/bin/python -m bench frontend --models resnet20,null --concurrency 1,64 --clients perf_analyzer --work /tmp/runs/abthread-work-$side --results /tmp/runs/abthread-$side-$round --doc /tmp/runs/abthread-$side-$round.md > /tmp/runs/abthread-$side-$round.log 2>&1
  echo "$side round $round"
  grep -E "server perf|floor perf" /tmp/runs/abthread-$side-$round.log
done
done
