#!/bin/sh
# LoLDU's accuracy-vs-parameters claim at small scale: LoLDU at ranks 1, 8, 64 and full against LoRA ranks 1 and 8
# (and the head-only probe) on wordnet-nouns (MiniLM), 3 seeds, two learning rates each (the better mean
# validation accuracy is reported). Run under the shared lock: flock /work/wt/heavy.lock sh benchmarks/loldu_rank_sweep.sh
set -e
OUT=${OUT:-runs/loldu_sweep}
COMMON="--task wordnet-nouns --seeds 0,1,2 --train-size 1000 --epochs 2 --max-length 16"
run() { name=$1; shift; python -m deltatune.cli compare "$@" $COMMON --out "$OUT/$name"; }
for lr in 3e-3 3e-2; do
  run "loldu-full-$lr" loldu --lr loldu=$lr
  run "lora-r8-$lr" lora -p lora:rank=8 --lr lora=$lr
  run "loldu-r1-$lr" loldu -p loldu:rank=1 --lr loldu=$lr
  run "lora-r1-$lr" lora -p lora:rank=1 --lr lora=$lr
  run "loldu-r8-$lr" loldu -p loldu:rank=8 --lr loldu=$lr
  run "loldu-r64-$lr" loldu -p loldu:rank=64 --lr loldu=$lr
done
run probe probe
