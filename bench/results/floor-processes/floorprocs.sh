#!/bin/bash
# 1 vs 2 floor processes sharing the port, null model, 4 perf_analyzer clients x c16 (own connections); alternated
cd "$(dirname "$0")/../../.."
REPO=${REPO:?a repository with the null model: python -c "from pathlib import Path; from bench import null_model; null_model.build(Path('DIR'))"}
LD=$(.venv/bin/python -c "import nvidia.cuda_runtime,os;print(os.path.join(list(nvidia.cuda_runtime.__path__)[0],'lib'))")
for round in 1 2; do
 for n in 1 2; do
  PORT=$(.venv/bin/python -c "from bench.serving import free_port; print(free_port())")
  .venv/bin/python -m bench.floor --repo $REPO --port $PORT --processes $n > ${WORK:-/tmp}/floor-$n.log 2>&1 &
  FP=$!
  sleep 4
  for k in 1 2 3 4; do
    LD_LIBRARY_PATH=$LD .venv/perf-analyzer/bin/perf_analyzer -m null -u 127.0.0.1:$PORT -i grpc --concurrency-range 16 -b 1 --measurement-mode time_windows -p 3000 -s 90 > ${WORK:-/tmp}/pa-$k.log 2>&1 &
  done
  wait $(jobs -p | grep -v $FP) 2>/dev/null
  for k in 1 2 3 4; do :; done
  total=$(grep -h "Throughput" ${WORK:-/tmp}/pa-*.log | head -4 | awk '{s+=$2} END {print s}')
  p50=$(grep -h "p50 latency" ${WORK:-/tmp}/pa-*.log | head -4 | awk '{print $3}' | tr '\n' ' ')
  # per-process CPU
  cpu=$(ps -o pid,time,args --ppid $FP -p $FP | grep bench.floor | awk '{print $2}' | tr '\n' ' ')
  echo "round $round processes $n: 4x c16 total $total infer/s; p50 us: $p50; floor cpu: $cpu"
  kill -TERM $FP; wait $FP
 done
done
